#!/usr/bin/env bash
# Create (or update) .venv with ptycho-export, ptycho-runtime and the test tools.
# torch is pinned to the CPU wheel that installs offline here; for a GPU see README "GPU install".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ./runtime -e ".[test]"
