#!/usr/bin/env bash
# Side by side, in one run: this machine's limits, lora's forward/merge cases and
# PyTorch's loralib-style cases, with the same thread count; then one ratio table.
# PyTorch runs with the environment as given and, in this command only, with
# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset.
# Usage: bench/compare.sh [threads=2] [build=build/release]   (needs python3-torch)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
threads=${1:-2}
build=${2:-$root/build/release}
py=${PYTHON:-/usr/bin/python3}
out=$(mktemp -d)
export OMP_NUM_THREADS=$threads

"$build/bench/bench_limits" --benchmark_format=json --benchmark_min_time=0.5 > "$out/limits.json"
"$build/bench/bench_forward" --benchmark_format=json --benchmark_min_time=0.3 \
  --benchmark_filter='BM_forward_(un)?merged|BM_merge_unmerge' > "$out/lora.json"
"$py" "$root/bench/compare_torch.py" --threads "$threads" > "$out/torch_env.json"
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$py" "$root/bench/compare_torch.py" --threads "$threads" \
  > "$out/torch_unset.json"

python3 - "$out" "$threads" <<'PY'
import json, re, sys
out, threads = sys.argv[1], sys.argv[2]
def gb(path):
    data = json.load(open(path))
    unit = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
    return {re.sub(r"^BM_|/real_time$", "", b["name"]): (b["real_time"] * unit[b["time_unit"]], b)
            for b in data["benchmarks"]}
limits, lora = gb(f"{out}/limits.json"), gb(f"{out}/lora.json")
t_env = json.load(open(f"{out}/torch_env.json"))
t_uns = json.load(open(f"{out}/torch_unset.json"))
read_gbs = limits["stream_read"][1]["GB/s"] / 1e9
rw_gbs = limits["stream_scale"][1]["GB/s"] / 1e9
peak = max(limits[k][1]["GFLOP/s"] for k in limits if k.startswith("sgemm_peak")) / 1e9
d = 4096
print(f"threads {threads}; torch {t_env['torch_version']}; read {read_gbs:.1f} GB/s, read+write {rw_gbs:.1f} GB/s, "
      f"peak SGEMM {peak:.0f} GFLOP/s\n")
print("| case | lora ms | % of limit | torch ms (env) | torch ms (OPENBLAS_* unset) | torch / lora (env) | torch / lora (unset) |")
print("|---|---|---|---|---|---|---|")
for key, (ms, b) in lora.items():
    tkey = key
    if key.startswith("merge_unmerge"):
        r = int(key.split(":")[1]); limit = 2 * max(8.0 * d * d / (rw_gbs * 1e9), 2.0 * r * d * d / (peak * 1e9)) * 1e3
    else:
        m = re.match(r"forward_(\w+)/r:(\d+)/n:(\d+)", key); n = int(m.group(3))
        limit = max(4.0 * d * d / (read_gbs * 1e9), 2.0 * n * d * d / (peak * 1e9)) * 1e3
    te, tu = t_env["cases"].get(tkey), t_uns["cases"].get(tkey)
    if te is None:
        continue
    print(f"| {key} | {ms:.3f} | {100 * limit / ms:.0f}% | {te:.3f} | {tu:.3f} | {te / ms:.2f} | {tu / ms:.2f} |")
PY
