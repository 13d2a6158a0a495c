#!/usr/bin/env bash
# Side by side, in one run: this machine's limits, lora's forward / merge /
# training-step cases and PyTorch's loralib-style cases, with the same thread
# count; then one table with each case's percentage of its limit, the ratios
# against PyTorch and the issue-5 targets (bench/compare_report.py).
#
# The run is R rounds (default 3); every round runs every program once, in the
# same order, and the report keeps each case's best round, so the two sides of
# every ratio saw the same stretch of machine time.
#
# Limits: bench_limits (STREAM-like read from DRAM and from L3 with a 64 MiB
# buffer, the size of the n = 1 W; in-place update of 64 MiB, merge()'s traffic;
# peak SGEMM), plus bench_limits_openblas / bench_limits_blis when the build has
# them (cmake -DLORA_BENCH_BLAS=ON: Eigen with EIGEN_USE_BLAS). OpenBLAS runs
# with the environment as given and, when OPENBLAS_CORETYPE is unset, also with
# OPENBLAS_CORETYPE=$LORA_BENCH_OPENBLAS_CORE (default SkylakeX: 0.3.21
# misdetects newer Xeons as Prescott). lora linked with lora::blas
# (bench_forward_openblas, bench_train_openblas: large products through OpenBLAS)
# runs that way too.
#
# PyTorch runs with the environment as given and, in this command only, with
# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset.
#
# Usage: bench/compare.sh [threads=2] [build=build/release]
# On a machine where other work runs, a 2-thread benchmark loses a time slice
# at every OpenMP barrier; run it as `chrt -f 10 bench/compare.sh 2` (as root),
# as docs/benchmarks.md did.
# Environment:
#   LORA_TORCH_PYTHON  interpreter with torch (default: build/torch-venv/bin/python
#                      if present, made by bench/setup-torch.sh; else /usr/bin/python3)
#   LORA_BENCH_OUT     where the JSON files go (default: build/bench-compare)
#   LORA_BENCH_ROUNDS  rounds (default 3)
#   LORA_BENCH_SWEEP   1: also the sweeps, both sides: the forward over n = 1..4096 and
#                      r = 1..128 (input of bench/plot.sh), the training step over
#                      n = 1..4096 and r = 1, 8, 128
#   LORA_BENCH_DIM     in = out of the forward, merge and step cases, both sides
#                      (default 4096; 8192: a 256 MiB W, past most hosts' L3)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
threads=${1:-2}
build=${2:-$root/build/release}
bin=$build/bench
if [[ -n "${LORA_TORCH_PYTHON:-}" ]]; then
  py=$LORA_TORCH_PYTHON
elif [[ -x "$root/build/torch-venv/bin/python" ]]; then
  py=$root/build/torch-venv/bin/python
else
  py=/usr/bin/python3
fi
out=${LORA_BENCH_OUT:-$root/build/bench-compare}
rounds=${LORA_BENCH_ROUNDS:-3}
sweep=${LORA_BENCH_SWEEP:-0}
dim=${LORA_BENCH_DIM:-4096}
export LORA_BENCH_DIM=$dim
core=${LORA_BENCH_OPENBLAS_CORE:-SkylakeX}
mkdir -p "$out"
rm -f "$out"/*.json
export OMP_NUM_THREADS=$threads

{
  echo "date: $(date -u +%FT%TZ)"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cpus"
  # The caches decide whether a 4096^2 W (64 MiB) streams from L3 or from DRAM.
  echo "caches: $(lscpu | sed -n 's/^\(L[23]\) cache: *\(.*\)/\1 \2/p' | paste -sd ';' | sed 's/;/; /g')"
  echo "threads: $threads"
  echo "dim: $dim"
  echo "torch python: $py"
  echo "OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE-<unset>} OPENBLAS_L2_SIZE=${OPENBLAS_L2_SIZE-<unset>}"
} > "$out/env.txt"
cat "$out/env.txt"

gb() { "$@" --benchmark_format=json --benchmark_min_time=0.2 2> /dev/null; }
fwd_filter='BM_forward_(un)?merged|BM_forward_pair|BM_forward_packed|BM_merge_unmerge'
[[ $sweep == 1 ]] && fwd_filter="$fwd_filter|BM_sweep_|BM_rsweep_"
train_filter='BM_train_step'
[[ $sweep == 1 ]] && train_filter='BM_train_(step|sweep)'
sweep_arg=()
[[ $sweep == 1 ]] && sweep_arg=(--sweep)

for ((k = 1; k <= rounds; ++k)); do
  echo "round $k/$rounds" >&2
  gb "$bin/bench_limits" > "$out/limits.eigen.$k.json"
  if [[ -x "$bin/bench_limits_openblas" ]]; then
    gb "$bin/bench_limits_openblas" --benchmark_filter=sgemm > "$out/limits.openblas.$k.json"
    if [[ -z "${OPENBLAS_CORETYPE:-}" ]]; then
      OPENBLAS_CORETYPE=$core gb "$bin/bench_limits_openblas" --benchmark_filter=sgemm \
        > "$out/limits.openblas-$core.$k.json"
    fi
  fi
  if [[ -x "$bin/bench_limits_blis" ]]; then
    gb "$bin/bench_limits_blis" --benchmark_filter=sgemm > "$out/limits.blis.$k.json"
  fi
  gb "$bin/bench_forward" --benchmark_filter="$fwd_filter" > "$out/lora.$k.json"
  gb "$bin/bench_train" --benchmark_filter="$train_filter" > "$out/train.$k.json"
  # lora linked with lora::blas (large products through OpenBLAS; its guard
  # needs the core type where OpenBLAS misdetects the CPU).
  if [[ -x "$bin/bench_forward_openblas" ]]; then
    OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-$core} gb "$bin/bench_forward_openblas" \
      --benchmark_filter='BM_forward_(un)?merged/r:(8|64)/n:256|BM_merge_unmerge|BM_sweep_(un)?merged/r:8/n:(64|128|256)/' \
      > "$out/lora_openblas.$k.json"
  fi
  if [[ -x "$bin/bench_train_openblas" ]]; then
    OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-$core} gb "$bin/bench_train_openblas" > "$out/train_openblas.$k.json"
  fi
  "$py" "$root/bench/compare_torch.py" --threads "$threads" --dim "$dim" "${sweep_arg[@]}" > "$out/torch_env.$k.json"
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$py" "$root/bench/compare_torch.py" --threads "$threads" \
    --dim "$dim" > "$out/torch_unset.$k.json"
done

python3 "$root/bench/compare_report.py" "$out"
