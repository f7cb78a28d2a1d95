#!/usr/bin/env bash
# Full CPU benchmark run: pytest-benchmark JSON + markdown report.
#
#   bash benchmarks/run_cpu.sh OUT_DIR [extra pytest args, e.g. -k N64_g1]
#
# Writes OUT_DIR/cpu.json (pytest-benchmark), OUT_DIR/cpu.md (benchmarks/report.py) and OUT_DIR/cpu.log.
# Python: $PYTHON, else the active virtualenv, else the first of python / .venv / ../venv that has
# torch, onnxruntime and pytest-benchmark. Takes roughly 15-25 minutes on 2 cores (N=128 at batch 256
# and the 2,000-position reconstruction dominate); PTYCHO_BENCH_SIZES / PTYCHO_BENCH_BATCHES narrow it.
set -euo pipefail

OUT="${1:?usage: bash benchmarks/run_cpu.sh OUT_DIR [pytest args...]}"
shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# glibc malloc: by default every buffer above the (dynamic, <= 32 MiB) mmap threshold is mmap'ed and
# unmapped again on free, and free memory above 128 KiB at the heap top is trimmed back to the kernel. Eager
# PyTorch allocates and frees its activations on every forward; at batch >= 64 they are tens to hundreds of
# MiB each (N=64: 64 filters x 64 x 64 x 4 B = 1 MiB per pattern -> 64 MiB at batch 64; N=128 at batch 256:
# 32 x 128 x 128 x 4 B x 256 = 512 MiB), so each forward pays fresh page faults and kernel page zeroing for
# every activation (measured here: ~370,000 minor faults per N=64 batch-64 forward untuned, ~1,000 tuned).
# 1 GiB for both thresholds keeps the largest single activation of any case here (512 MiB) on the heap and
# keeps up to 1 GiB of freed heap for reuse instead of returning it. Glibc only reads these at process start,
# hence here and not in Python. Cost: up to 1 GiB of extra resident memory per process.
: "${MALLOC_MMAP_THRESHOLD_:=1073741824}"
: "${MALLOC_TRIM_THRESHOLD_:=1073741824}"
export MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_

has_deps() { "$1" -c "import torch, onnxruntime, pytest_benchmark, ptycho_export, ptycho_runtime" >/dev/null 2>&1; }
PY=""
for cand in "${PYTHON:-}" "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" python3 python "$REPO/.venv/bin/python" \
            "$REPO/../venv/bin/python"; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && has_deps "$cand"; then PY="$cand"; break; fi
done
if [ -z "$PY" ]; then
    echo "run_cpu.sh: no Python with torch, onnxruntime, pytest-benchmark and ptycho_export/ptycho_runtime;" \
         "set PYTHON=/path/to/venv/bin/python" >&2
    exit 2
fi

echo "python: $PY"
echo "MALLOC_MMAP_THRESHOLD_=$MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_=$MALLOC_TRIM_THRESHOLD_"
echo "output: $OUT"
start=$(date +%s)
rc=0
"$PY" -m pytest benchmarks/ --benchmark-enable --benchmark-json "$OUT/cpu.json" -p no:cacheprovider -q \
    --benchmark-columns=min,median,max,rounds "$@" 2>&1 | tee "$OUT/cpu.log" || rc=$?
echo "pytest exit status $rc after $(( $(date +%s) - start )) s"
if [ -s "$OUT/cpu.json" ]; then
    "$PY" benchmarks/report.py "$OUT/cpu.json" -o "$OUT/cpu.md"
    echo "report: $OUT/cpu.md"
fi
exit "$rc"
