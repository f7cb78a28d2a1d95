#!/usr/bin/env bash
# The whole test-suite, as CI runs it:
#  0. ruff (the lint rules in pyproject.toml) over the whole tree;
#  1. training side + runtime tests in .venv (torch installed);
#  2. the runtime tests again in .venv-runtime, a venv WITHOUT torch (proves the runtime needs none);
#  3. the ptychodus tests in .venv-ptychodus (ptychodus 1.7.0, no torch): a real ptychodus runs the runtime;
#  4. Triton and Dask in .venv-cluster (scripts/test_cluster.sh): a real tritonserver via PyTriton, a Dask cluster;
#  5. the benchmarks in smoke mode (they must stay runnable; speed is not asserted).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export CUDA_VISIBLE_DEVICES=""
bash scripts/setup.sh

echo "== lint (ruff)"
.venv/bin/ruff check .

echo "== 1/5 tests (torch environment)"
.venv/bin/python -m pytest -p no:cacheprovider -q

echo "== 2/5 runtime tests without torch"
if [ ! -x .venv-runtime/bin/python ]; then
  "$PYTHON" -m venv .venv-runtime
fi
.venv-runtime/bin/python -m pip install -q --disable-pip-version-check -e "./runtime[cpu]" pytest matplotlib
if .venv-runtime/bin/python -c "import torch" 2>/dev/null; then
  echo "torch is importable in .venv-runtime; the torch-free check would prove nothing" >&2
  exit 1
fi
FIXTURES=$(mktemp -d)
trap 'rm -rf "$FIXTURES"' EXIT
.venv/bin/python -m ptycho_export.testing "$FIXTURES"
PTYCHO_TEST_BUNDLE_DIR="$FIXTURES" .venv-runtime/bin/python -m pytest -p no:cacheprovider -q \
  -c runtime/pytest.ini --rootdir runtime runtime/tests

echo "== 3/5 ptychodus tests (ptychodus 1.7.0, without torch)"
if [ ! -x .venv-ptychodus/bin/python ]; then
  "$PYTHON" -m venv .venv-ptychodus
fi
.venv-ptychodus/bin/python -m pip install -q --disable-pip-version-check -e './runtime[cpu,ptychodus]' pytest
PTYCHO_TEST_BUNDLE_DIR="$FIXTURES" .venv-ptychodus/bin/python -m pytest -p no:cacheprovider -q \
  -c runtime/pytest.ini --rootdir runtime runtime/tests/test_ptychodus.py runtime/tests/test_worker.py
# the ptychodus-made independent scan (benchmarks/independent_scans.py); the repository root is on sys.path (-m)
.venv-ptychodus/bin/python -m pytest -p no:cacheprovider -q -o addopts="" tests/test_independent_scans.py

echo "== 4/5 Triton and Dask: triton-repo, serve, the triton backend, infer-many (own venv)"
PTYCHO_TEST_BUNDLE_DIR="$FIXTURES" bash scripts/test_cluster.sh

echo "== 5/5 benchmarks, smoke mode"
PTYCHO_BENCH_SMOKE=1 .venv/bin/python -m pytest -p no:cacheprovider -q benchmarks --benchmark-disable
