#!/usr/bin/env bash
# Create (or update) .venv with ptycho-export, ptycho-runtime (with the CPU onnxruntime and numba's compiled
# loops: the [cpu] and [fast] extras) and the test tools (pytest, ruff). torch is pinned to the CPU wheel; for a
# GPU see README "Installs: CPU or GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e "./runtime[cpu,fast]" -e ".[cpu,test]"
# pty-chi for `ptycho-export evaluate --reference`: without its declared deps, because PyPI's torchvision
# (which it declares but only needs for random initial guesses) is built for CUDA torch and would not load
# next to the CPU wheel; the packages it does import are installed explicitly (the `reference` extra's list).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "ptychi>=2.2,<3"
.venv/bin/python -m pip install -q --disable-pip-version-check "pydantic>=2,<3" pandas scikit-learn scipy tifffile \
  tqdm h5py "torch==2.13.0"
