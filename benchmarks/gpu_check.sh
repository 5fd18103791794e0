#!/usr/bin/env bash
# The one script a GPU host runs: the gpu-marked tests, the full-size benchmark (≤ 8 min on one H100), then the
# training-step levers (benchmarks/rows_train_levers.py).
# Usage: bash benchmarks/gpu_check.sh [extra benchmark flags, e.g. --compile, --only caption, --engine static]
#        PY=python3 OUT_DIR=/tmp/out bash benchmarks/gpu_check.sh   (a host whose python already has torch,
#        transformers, timm, pytest: no .venv needed; results and logs go to OUT_DIR)
# Writes $OUT_DIR/results_<gpu>.json (e.g. results_h100.json; OUT_DIR defaults to benchmarks/) and the logs beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-benchmarks}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible: run this on a GPU host')"
$PY -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
echo "==> gpu-marked tests"
# The gpu tests live in these files; naming them keeps collection away from notebook tests (papermill not needed).
status=0
$PY -m pytest -m gpu -o addopts="--strict-markers -ra" -p no:cacheprovider tests/unit/test_llm.py \
    tests/unit/test_engine.py tests/unit/test_precision.py tests/unit/test_preflight.py \
    tests/unit/test_eval_pipeline.py tests/unit/test_train_levers.py tests/gpu/test_static_decode_gpu.py \
    2>&1 | tee "$OUT_DIR/gpu_tests.log" || status=1
name=$($PY -c "import torch; n = torch.cuda.get_device_name().lower(); print(next((g for g in ('h200', 'h100', 'a100', 'l40s', 'l4') if g in n), 'gpu'))")
out="$OUT_DIR/results_${name}.json"
echo "==> benchmark -> $out"
$PY benchmarks/gpu.py --out "$out" "$@" 2>&1 | tee "${out%.json}.log" || status=1
levers="$OUT_DIR/levers_${name}.json"  # each training-step lever off and on, same model, one process
echo "==> training-step levers -> $levers"
$PY benchmarks/rows_train_levers.py --compile --out "$levers" 2>&1 | tee "${levers%.json}.log" || status=1
exit $status
