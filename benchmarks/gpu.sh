#!/usr/bin/env bash
# GPU benchmark run, prepared to finish within ~5 minutes on one GPU. Installs nothing: it expects a Python
# (PYTHON=..., the active venv, or python3 on PATH) with a CUDA build of torch, onnxruntime-gpu, onnx,
# pytest-benchmark and this repository installed (pip install -e './runtime[gpu]' -e '.[gpu,test]').
#
#   bash benchmarks/gpu.sh OUT_DIR
#
# Writes into OUT_DIR: env.txt (nvidia-smi, versions), gpu_main.json + gpu_main.log (stage 1),
# gpu_trt.json + gpu_trt.log (stage 2), gpu.md (benchmarks/report.py over both).
#   stage 1 (<= STAGE1_S, default 170 s): inference for every size and batch on eager (CPU NCHW baseline),
#     eager_cuda and ort_cuda; reconstruct on CUDA (+ stitching, + the eager CPU baseline); cold start on
#     CUDA at N=64; FLOPs and the CPU matmul peak.
#   stage 2 (the rest of TOTAL_S, default 290 s): ort_tensorrt_fp16 at N=64 and N=128 gridsize 1 with
#     eager / eager_cuda in the same run for the ratios. TensorRT builds its engines here (engine cache in a
#     temporary folder); a stage that overruns is interrupted (SIGINT) and still writes its JSON.
set -uo pipefail

OUT="${1:?usage: bash benchmarks/gpu.sh OUT_DIR}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO"
T0=$(date +%s)
TOTAL_S="${TOTAL_S:-290}"
STAGE1_S="${STAGE1_S:-170}"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then PY="$VIRTUAL_ENV/bin/python"; else PY="$(command -v python3 || command -v python)"; fi
fi

# See run_cpu.sh: glibc malloc thresholds for the eager CPU baseline (read at process start).
: "${MALLOC_MMAP_THRESHOLD_:=1073741824}"
: "${MALLOC_TRIM_THRESHOLD_:=1073741824}"
export MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_
export PTYCHO_BENCH_TARGET_S="${PTYCHO_BENCH_TARGET_S:-0.75}"
export PTYCHO_BENCH_COLD_ROUNDS="${PTYCHO_BENCH_COLD_ROUNDS:-2}"
unset PTYCHO_BENCH_SMOKE

# ---- is CUDA really usable? (onnxruntime-gpu lists CUDA even where it cannot run; make a session and look)
# PTYCHO_BENCH_GPU_CHECK=0 skips the check: only for rehearsing this script on a CPU host (GPU cases skip).
[ "${PTYCHO_BENCH_GPU_CHECK:-1}" = 0 ] && CHECK_ONLY_INFO=1 || CHECK_ONLY_INFO=0
CHECK_ONLY_INFO=$CHECK_ONLY_INFO "$PY" - > "$OUT/env.txt" 2>&1 <<'EOF'
import os
import sys
def fail(msg):
    print("GPU CHECK FAILED: " + msg)
    sys.exit(0 if os.environ.get("CHECK_ONLY_INFO") == "1" else 3)
try:
    import onnxruntime as ort
    import onnx
    from onnx import TensorProto, helper
except ImportError as exc:
    fail(f"cannot import onnxruntime/onnx: {exc}")
print("python", sys.version.split()[0], "onnxruntime", ort.__version__, "onnx", onnx.__version__)
available = ort.get_available_providers()
print("onnxruntime providers:", available)
if "CUDAExecutionProvider" not in available:
    fail("this onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu (nothing is installed here)")
graph = helper.make_graph([helper.make_node("Add", ["X", "X"], ["Y"])], "probe",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
try:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
except Exception as exc:
    fail(f"could not create a CUDA session: {exc}")
if sess.get_providers()[0] != "CUDAExecutionProvider":
    fail(f"a session asked for CUDA runs on {sess.get_providers()} (no GPU visible or CUDA/cuDNN libraries missing)")
import numpy as np
sess.run(None, {"X": np.ones((1, 4), np.float32)})
print("onnxruntime CUDA session: OK")
try:
    import torch
    print("torch", torch.__version__, "cuda available:", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(eager_cuda will be skipped)")
except ImportError as exc:
    fail(f"cannot import torch: {exc}")
try:
    import pytest_benchmark, ptycho_export, ptycho_runtime  # noqa: F401
except ImportError as exc:
    fail(f"missing package: {exc} (install pytest-benchmark and this repo: pip install -e runtime -e .)")
EOF
check=$?
cat "$OUT/env.txt"
if [ $check -ne 0 ]; then
    echo "gpu.sh: CUDA is not usable with $PY; nothing was benchmarked (see $OUT/env.txt)." >&2
    exit 3
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv >> "$OUT/env.txt" 2>&1

run_stage() {  # name seconds [pytest args...]
    local name=$1 secs=$2
    shift 2
    echo "== stage $name (limit ${secs}s) =="
    timeout -s INT -k 30 "$secs" "$PY" -m pytest "$@" --benchmark-enable --benchmark-json "$OUT/$name.json" \
        -p no:cacheprovider -q --benchmark-columns=min,median,rounds 2>&1 | tee "$OUT/$name.log"
    echo "stage $name: exit ${PIPESTATUS[0]} at $(( $(date +%s) - T0 )) s"
}

run_stage gpu_main "$STAGE1_S" benchmarks/test_inference.py benchmarks/test_reconstruct.py \
    benchmarks/test_cold_start.py benchmarks/test_flops.py \
    -k "((eager and not channels_last) or ort_cuda or cuda or stitch or flops or peak) and not (cold and cpu) and not (cold and N128) and not tensorrt"

left=$(( TOTAL_S - ($(date +%s) - T0) ))
if [ "$left" -gt 40 ]; then
    TRT_CACHE="$(mktemp -d)"
    # run from a scratch folder: onnxruntime's TensorRT EP writes its engine cache to the working directory
    (cd "$TRT_CACHE" && PTYCHO_BENCH_SIZES=64x1,128x1 run_stage gpu_trt "$left" \
        "$REPO/benchmarks/test_inference.py" -k "tensorrt or eager_cuda or (eager and not channels_last)")
    rm -rf "$TRT_CACHE"
else
    echo "gpu.sh: only ${left}s left, TensorRT stage skipped"
fi

jsons=()
for f in "$OUT/gpu_main.json" "$OUT/gpu_trt.json"; do [ -s "$f" ] && jsons+=("$f"); done
if [ ${#jsons[@]} -gt 0 ]; then
    "$PY" "$REPO/benchmarks/report.py" "${jsons[@]}" -o "$OUT/gpu.md" && echo "report: $OUT/gpu.md"
fi
echo "gpu.sh done in $(( $(date +%s) - T0 )) s"
