#!/usr/bin/env bash
# The main job on the embedded default: simulate a 'lines' scan → train PtychoPINN briefly →
# write the bundle (weights + TorchScript + ONNX, parity-checked) → reconstruct the held-out
# part of the scan with the lightweight runtime → stitched image + report.
# Usage: bash scripts/demo.sh [OUTPUT_DIR] [extra 'ptycho-export train' options]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/demo}
shift || true
bash scripts/setup.sh
.venv/bin/ptycho-export train --simulate lines --n-filters-scale 1 --epochs 25 --object-size 160 --step 8 \
  --output-dir "$OUT" "$@"
.venv/bin/ptycho-runtime infer "$OUT/wts.h5" "$OUT/test_scan.npz" -o "$OUT/runtime_recon.h5" --png "$OUT/runtime_recon.png"
echo "done: $OUT/report.md, $OUT/reconstruction.png (eager), $OUT/runtime_recon.png (runtime)"
