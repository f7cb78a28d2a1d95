#!/usr/bin/env bash
# The main job on the embedded default: simulate a 'lines' scan → train PtychoPINN within a time budget
# (supervised pre-training on synthetic objects through the scan's own probe, then physics training on the
# scan) → write the bundle (weights + TorchScript + ONNX, parity-checked) → score the held-out part of the
# scan against the truth next to pty-chi's ePIE (figure: truth / network / reference / errors) → reconstruct
# it again with the lightweight runtime.
# Usage: bash scripts/demo.sh [OUTPUT_DIR] [extra 'ptycho-export train' options]   (later options win)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/demo}
shift || true
bash scripts/setup.sh
.venv/bin/ptycho-export train --simulate lines --n-filters-scale 1 --object-size 160 --step 8 --gridsize 2 \
  --time-budget 5 --epochs 1000 --threads 1 --output-dir "$OUT" "$@"
.venv/bin/ptycho-export evaluate "$OUT/wts.h5" "$OUT/test_scan.npz" --reference epie --reference-iterations 60 \
  --figure "$OUT/evaluation.png" -o "$OUT/evaluation.json"
.venv/bin/ptycho-runtime infer "$OUT/wts.h5" "$OUT/test_scan.npz" -o "$OUT/runtime_recon.h5" --png "$OUT/runtime_recon.png"
echo "done: $OUT/evaluation.png (truth / network / ePIE / errors), $OUT/evaluation.json, $OUT/report.md,"
echo "      $OUT/reconstruction.png (eager), $OUT/runtime_recon.png (runtime)"
