#!/usr/bin/env bash
# DoRA / LoRA, ours against PEFT's, in one run (issue 13): R rounds (default 2),
# each running bench_dora (JSON) then bench/compare_dora.py (PEFT's DoRA and
# LoRA on the same shapes, same thread count), then one markdown table of the
# DoRA / LoRA ratios, "ours X / PEFT Y" per case: for each side and case the
# round with the lowest LoRA + DoRA time, and that round's ratio
# (compare_dora.py --report, standard library only).
#
# Usage: bench/compare_dora.sh [threads=2] [build=build/release]
# On a machine where other work runs, a 2-thread benchmark loses a time slice
# at every OpenMP barrier; run it as `chrt -f 10 bench/compare_dora.sh 2` (as
# root), as docs/benchmarks.md says for bench/compare.sh.
# Environment:
#   LORA_TORCH_PYTHON     interpreter with torch and peft (default:
#                         /tmp/torchenv/bin/python if present, else python3)
#   LORA_BENCH_OUT        where the JSON files go (default: build/bench-dora)
#   LORA_BENCH_ROUNDS     rounds (default 2)
#   LORA_BENCH_DIM        PEFT side's in = out (default 4096, bench_dora's fixed
#                         size; smaller only to try this script quickly)
#   LORA_DORA_BENCH_ARGS  extra bench_dora arguments, e.g.
#                         '--benchmark_filter=<8>/16 --benchmark_min_time=0.1'
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
threads=${1:-2}
build=${2:-$root/build/release}
if [[ -n "${LORA_TORCH_PYTHON:-}" ]]; then
  py=$LORA_TORCH_PYTHON
elif [[ -x /tmp/torchenv/bin/python ]]; then
  py=/tmp/torchenv/bin/python
else
  py=python3
fi
out=${LORA_BENCH_OUT:-$root/build/bench-dora}
rounds=${LORA_BENCH_ROUNDS:-2}
dim=${LORA_BENCH_DIM:-4096}
read -r -a extra <<< "${LORA_DORA_BENCH_ARGS:-}"
mkdir -p "$out"
rm -f "$out"/ours.*.json "$out"/ours.*.log "$out"/peft.*.json
export OMP_NUM_THREADS=$threads

{
  echo "date: $(date -u +%FT%TZ)"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cpus"
  echo "caches: $(lscpu | sed -n 's/^\(L[23]\) cache: *\(.*\)/\1 \2/p' | paste -sd ';' | sed 's/;/; /g')"
  echo "threads: $threads"
  echo "ours: $build/bench/bench_dora ${extra[*]}"
  echo "PEFT: $py"
} > "$out/env.txt"

for ((k = 1; k <= rounds; ++k)); do
  echo "round $k/$rounds" >&2
  if ! "$build/bench/bench_dora" --benchmark_format=json "${extra[@]}" > "$out/ours.$k.json" 2> "$out/ours.$k.log"; then
    cat "$out/ours.$k.log" >&2
    exit 1
  fi
  "$py" "$root/bench/compare_dora.py" --threads "$threads" --dim "$dim" --out "$out/peft.$k.json"
done

python3 "$root/bench/compare_dora.py" --report "$out"
