#!/usr/bin/env bash
# Train on a GPU with the package's own CLI, on the project's realistic scans, and score each result:
# how the default method scales with compute, and the source of the shipped pretrained bundle.
#
#   bash scripts/gpu_train.sh OUT_DIR [MINUTES]        (DEVICE=cpu to rehearse; VARIANTS="A" for one run)
#
# 1. writes the realistic training scan (seed 1) and the held-out scan (seed 2), as scripts/demo.sh does;
# 2. trains the variants below side by side on one GPU (each a plain `ptycho-export train`, MINUTES budget);
# 3. scores each bundle with `ptycho-export evaluate` on the held-out scan (no iterative reference here);
# 4. times eager CUDA inference of variant A's model;
# 5. packs bundles, logs and reports into OUT_DIR/results.tar, split into 15 MiB parts (results.tar.00, ...).
set -uo pipefail
OUT="${1:?usage: bash scripts/gpu_train.sh OUT_DIR [MINUTES]}"
MINUTES="${2:-5}"
DEVICE="${DEVICE:-cuda}"
VARIANTS="${VARIANTS:-A B C}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO:$REPO/runtime" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
WORK="$(mktemp -d)"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

{ "$PY" -c "import sys, torch, onnxruntime, onnx, h5py, skimage; print(sys.version.split()[0], 'torch', torch.__version__,
'onnxruntime', onnxruntime.__version__, 'onnx', onnx.__version__, 'skimage', skimage.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  nproc; } > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

stamp "writing the realistic scans"
"$PY" -m ptycho_export.data.realistic "$WORK" || { echo "could not write the scans"; exit 2; }

variant_args() {
  case "$1" in
    A) echo "--n-filters-scale 1" ;;                               # the CPU defaults, more compute
    B) echo "--n-filters-scale 1 --batch-size 64 --lr 2e-3" ;;     # bigger batches for the GPU
    C) echo "--n-filters-scale 2 --batch-size 64" ;;               # a wider network
  esac
}
for v in $VARIANTS; do
  ( cd "$WORK" && "$PY" -m ptycho_export.cli train --data train.npz --test-data test.npz --gridsize 2 \
      --epochs 100000 --time-budget "$MINUTES" --device "$DEVICE" --threads 4 --output-dir "$v" \
      $(variant_args "$v") > "$v.log" 2>&1; echo "exit $?" >> "$v.log" ) &
done
wait
stamp "trained"
for v in $VARIANTS; do
  ( cd "$WORK" && "$PY" -m ptycho_export.cli evaluate "$v/wts.h5" test.npz -o "$v/eval.json" \
      --figure "$v/eval.png" > "$v/eval.log" 2>&1; echo "exit $?" >> "$v/eval.log" ) &
done
wait
stamp "evaluated"
for v in $VARIANTS; do
  echo "== $v: $(variant_args "$v")"; tail -n 4 "$WORK/$v.log"; grep -A3 -i "phase ssim\|network" "$WORK/$v/eval.log" | head -n 8
done

[ "$DEVICE" = cuda ] && "$PY" - "$WORK/A/wts.h5" > "$WORK/inference_speed.txt" 2>&1 <<'PYEOF'
import sys, time, torch
from ptycho_export.model_manager import load_torch_bundle
model, params = load_torch_bundle(sys.argv[1], model_name="diffraction_to_obj")
model = model.cuda().eval().to(memory_format=torch.channels_last)
C, N = int(params["gridsize"]) ** 2, int(params["N"])
for batch in (64, 256, 1024):
    x = torch.rand(batch, C, N, N, device="cuda").contiguous(memory_format=torch.channels_last)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            for _ in range(3):
                model(x)
            torch.cuda.synchronize(); t = time.perf_counter(); reps = 10
            for _ in range(reps):
                model(x)
            torch.cuda.synchronize(); dt = (time.perf_counter() - t) / reps
        print(f"eager cuda {str(dtype)[6:]:9s} batch {batch:5d} groups: {dt * 1e3:8.2f} ms, "
              f"{batch * C / dt:10.0f} patterns/s")
PYEOF
cat "$WORK/inference_speed.txt" 2>/dev/null

(cd "$WORK" && for v in $VARIANTS; do rm -f "$v/test_scan.npz"; done
 tar cf results.tar env.txt ./*.log inference_speed.txt $VARIANTS 2>/dev/null
 split -b 15M -d results.tar "$OUT/results.tar.")
ls -la "$OUT"
stamp "done"
