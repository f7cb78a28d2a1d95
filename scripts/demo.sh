#!/usr/bin/env bash
# The main job on the embedded default, the project's realistic benchmark (docs/fidelity.md): a zone-plate
# probe with a central stop, ~7e5 photons per frame, a 1,000-position Fermat spiral, a dead-leaves object,
# written as instruments write files (sqrt(counts), probe at an arbitrary scale, positions at (N-1)/2).
#
#  1. write the training scan and the held-out scan (a different object);
#  2. train PtychoPINN briefly on the training scan (--time-budget 2): the loss falls, a bundle is written;
#  3. reconstruct the held-out scan with the SHIPPED bundle (models/realistic-zoneplate-n64-g2.h5, trained by
#     `ptycho-export train` on this scan family, its command inside it, remade by scripts/gpu_train.sh):
#     the network alone, the network + 16 sweeps of the runtime's batched refinement from its object, the same
#     sweeps from a flat object (the control), and pty-chi's ePIE (100 iterations) from a flat start, each
#     scored against the truth (figure: truth / each method / errors);
#  4. score the briefly trained bundle the same way (without the pty-chi reference);
#  5. reconstruct the held-out scan again with the lightweight runtime (numpy, ONNX Runtime and, where the
#     [fast] extra is installed as here, numba's compiled loops; no torch): the
#     network and, by default, 16 refinement sweeps with the scan's own probe.
# About 6-8 minutes on 2 CPU cores after the install.
# Usage: bash scripts/demo.sh [OUTPUT_DIR] [extra 'ptycho-export train' options]   (later options win)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/demo}
shift || true
SHIPPED=models/realistic-zoneplate-n64-g2.h5
bash scripts/setup.sh
.venv/bin/python -m ptycho_export.data.realistic "$OUT"
.venv/bin/ptycho-export train --data "$OUT/train.npz" --test-data "$OUT/test.npz" --gridsize 2 \
  --n-filters-scale 1 --time-budget 2 --epochs 100000 --threads 1 --output-dir "$OUT/brief" "$@"
.venv/bin/ptycho-export evaluate "$SHIPPED" "$OUT/test.npz" --refine --reference epie \
  --figure "$OUT/evaluation.png" -o "$OUT/evaluation.json"
.venv/bin/ptycho-export evaluate "$OUT/brief/wts.h5" "$OUT/test.npz" --refine \
  --figure "$OUT/brief/evaluation.png" -o "$OUT/brief/evaluation.json"
.venv/bin/ptycho-runtime infer "$SHIPPED" "$OUT/test.npz" -o "$OUT/runtime_recon.h5" --png "$OUT/runtime_recon.png"
echo "What to expect (the README's table), from this run:"
.venv/bin/python -m ptycho_export.expect_table "$OUT"
echo "done:"
echo "  $OUT/evaluation.png        the shipped bundle ($SHIPPED) on the held-out scan:"
echo "                             truth / network / network + refinement / flat + refinement / pty-chi ePIE / errors"
echo "                             ($OUT/evaluation.json)"
echo "  $OUT/brief/evaluation.png  the bundle trained 2 minutes here ($OUT/brief/wts.h5), same scoring"
echo "  $OUT/brief/report.md       its training report (loss per epoch in $OUT/brief/history.json)"
echo "  $OUT/runtime_recon.png     the shipped bundle through ptycho-runtime (network + 16 refinement sweeps, the default)"
