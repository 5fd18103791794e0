#!/usr/bin/env bash
# The one script a GPU host runs: the gpu-marked tests, then the full-size benchmark (≤ 8 min on one H100).
# Usage: bash benchmarks/gpu_check.sh [extra benchmark flags, e.g. --compile or --only caption]
# Writes benchmarks/results_<gpu>.json (e.g. results_h100.json) and the console log next to it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible: run this on a GPU host')"
echo "==> make gpu-check"
make gpu-check
name=$($PY -c "import torch; n = torch.cuda.get_device_name().lower(); print(next((g for g in ('h200', 'h100', 'a100', 'l40s', 'l4') if g in n), 'gpu'))")
out="benchmarks/results_${name}.json"
echo "==> benchmark -> $out"
$PY benchmarks/gpu.py --out "$out" "$@" 2>&1 | tee "${out%.json}.log"
