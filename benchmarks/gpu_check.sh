#!/usr/bin/env bash
# The GPU check in one command, on a machine with a CUDA device (and no package registry):
#   bash scripts/gpu_wheels.sh            # here, once: the wheels it lacks, into .whl/
#   bash benchmarks/gpu_check.sh [OUT]    # there: installs .whl offline, runs the `cuda` tests and
#                                         # benchmarks/device_compare.py, and qrunner vs auto-round
#                                         # on the GPU (about 8 minutes on an H200)
# Everything it finds goes to OUT (default: $OUT, else gpu_results/).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_results}}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qrunner-site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/qrunner-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
(nvidia-smi; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)") \
  > "$out/machine.txt" 2>&1
timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_device.py 2>&1 | tee "$out/cuda_tests.txt"
timeout 300 python3 benchmarks/device_compare.py --out "$out" 2>&1 | tail -40 | tee "$out/device_compare.log"
if python3 -c "import auto_round" 2>/dev/null; then
  timeout 240 python3 benchmarks/compare_autoround.py --device cuda --schemes w4a16 --iters 200 --nsamples 128 \
    --out "$out" 2>&1 | tail -20 | tee "$out/compare_autoround_cuda.log"
fi
