#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has Python 3.12, torch, transformers, accelerate, safetensors, rich, tqdm,
# psutil, matplotlib, pytest; no package registry): hydra-core, omegaconf and antlr4 (built here: PyPI has only
# its source), and for the comparison with auto-round on the GPU auto-round with what it needs that the machine
# lacks (pydantic, datasets, ...), into .whl/ (git-ignored through .git/info/exclude). Then carry .whl to the
# machine and run benchmarks/gpu_check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  hydra-core==1.3.2 omegaconf==2.3.0 auto-round==0.16.1 pydantic==2.13.4 pydantic-core==2.46.4 \
  annotated-types==0.7.0 typing-inspection==0.4.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
python3 -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
