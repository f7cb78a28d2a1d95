#!/usr/bin/env bash
# Tests of the runtime's paths beyond one process (issue 13): Triton (triton-repo, serve, the triton backend)
# and Dask (infer-many), in their own venv .venv-cluster with the [serve,dask] extras.
#
# PyTriton's Python-backend stub loads the interpreter's shared libpython, so the venv is made from Debian's
# /usr/bin/python3.11 (CLUSTER_PYTHON overrides). Without such an interpreter the venv gets only the Dask and
# tritonclient extras and the serve tests skip. Fixture bundles come from $PTYCHO_TEST_BUNDLE_DIR
# (scripts/test.sh makes them) or are built with ptycho_export when that is importable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${CLUSTER_PYTHON:-/usr/bin/python3.11}
EXTRAS="cpu,serve,dask,test"  # cpu: onnxruntime, where the runtime makes it an extra
if [ ! -x "$PY" ] || ! "$PY" -c "import ensurepip, sysconfig, sys; sys.exit(not sysconfig.get_config_var('Py_ENABLE_SHARED'))" 2>/dev/null; then
  echo "no Python with a shared libpython at $PY: PyTriton (serve) tests will skip" >&2
  PY=${PYTHON:-python3}
  EXTRAS="cpu,triton,dask,test"
fi
if [ ! -x .venv-cluster/bin/python ]; then
  "$PY" -m venv .venv-cluster
fi
# --no-compile: byte-compiling every installed file (PyTriton, onnx, grpc ...) took longer than the tests need
.venv-cluster/bin/python -m pip install -q --disable-pip-version-check --no-compile -e "./runtime[$EXTRAS]" pytest-timeout
OMP_NUM_THREADS=1 .venv-cluster/bin/python -m pytest -p no:cacheprovider -q -c runtime/pytest.ini --rootdir runtime \
  --timeout 300 -p no:logging runtime/tests/test_partial_canvas.py runtime/tests/test_triton_repo.py \
  runtime/tests/test_triton_serve.py runtime/tests/test_infer_many.py
