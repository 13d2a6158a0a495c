#!/usr/bin/env bash
# Benchmark-only tool: a virtual environment with PyPI's PyTorch wheel, for the
# side-by-side comparison (bench/compare.sh). Neither the build nor the tests
# need it. PyPI's default Linux wheel pulls the CUDA runtime packages too
# (about 5 GiB in all); where download.pytorch.org is reachable, set
# LORA_TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU-only wheel.
# Usage: bench/setup-torch.sh [venv=build/torch-venv]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/build/torch-venv}
python=${PYTHON:-python3}
"$python" -m venv "$venv"
index=()
[[ -n "${LORA_TORCH_INDEX:-}" ]] && index=(--index-url "$LORA_TORCH_INDEX")
"$venv/bin/pip" install "${index[@]}" torch numpy
"$venv/bin/python" -c 'import torch; print("torch", torch.__version__, "mkl:", torch.backends.mkl.is_available())'
