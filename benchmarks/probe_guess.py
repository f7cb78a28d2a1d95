"""A scan whose probe guess is wrong, as a real scan's is: the file's probe defocused, everything else kept.

Issue 17's "unknown probe" check: a bundle's training probe, or last week's
probe of the same optics, is never the probe of the next scan, and the most
common way it differs is focus (the sample or the optic moved along the beam).
This writes a copy of a PtychoPINN NPZ whose ``probeGuess`` is the file's own
probe propagated out of focus; the diffraction, positions and ``objectGuess``
(the truth) are untouched, so ``ptycho-export evaluate ... --refine-probe``
scores how much of the loss refinement of the probe wins back.

Defocus is a quadratic phase on the probe's pupil (its Fourier transform), as
free-space propagation over a short distance is: ``defocus`` radians at spatial
frequency ``DEFOCUS_RADIUS`` cycles per pixel, the unit of
``ptycho_export.data.realistic.zone_plate_probe`` (whose pupil edge lies there),
so ``--defocus 6`` on the realistic scan's probe (defocus 12) gives exactly
that zone plate at defocus 18. The absolute scale of the file's probe is kept.

Run::

    .venv/bin/python -m benchmarks.probe_guess test.npz test-defocus6.npz --defocus 6
    .venv/bin/ptycho-export evaluate models/realistic-zoneplate-n64-g2.h5 test-defocus6.npz --refine --refine-probe
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import numpy as np

DEFOCUS_RADIUS = 0.25  # cycles per pixel at which ``defocus`` is the pupil's phase (realistic.zone_plate_probe's rim)


def defocus_probe(probe: np.ndarray, defocus: float) -> np.ndarray:
    """``probe`` [N, N] (centred) propagated out of focus: pupil × exp(i·defocus·(|f| / DEFOCUS_RADIUS)²)."""
    P = np.asarray(probe, np.complex128)
    f = np.fft.fftfreq(P.shape[0])
    rho2 = (f[None, :] ** 2 + f[:, None] ** 2) / DEFOCUS_RADIUS**2
    pupil = np.fft.fft2(np.fft.ifftshift(P)) * np.exp(1j * defocus * rho2)
    return np.fft.fftshift(np.fft.ifft2(pupil)).astype(np.complex64)  # unitary: Σ|P|² is kept


def probe_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """|⟨a, b⟩| / (‖a‖ ‖b‖): 1 for the same probe at any scale and global phase, 0 for orthogonal ones."""
    a, b = np.asarray(a, np.complex128).ravel(), np.asarray(b, np.complex128).ravel()
    return float(abs(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))


def write_defocused_scan(source: str, target: str, defocus: float) -> dict:
    """Copy the NPZ ``source`` to ``target`` with its ``probeGuess`` defocused; return the guess's summary."""
    from ptycho_export.data.realistic import probe_diameter
    from ptycho_runtime.files.npz import write_npz_arrays

    with np.load(source, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if "probeGuess" not in arrays:
        raise SystemExit(f"{source} has no probeGuess to perturb")
    true = arrays["probeGuess"]
    arrays["probeGuess"] = defocus_probe(true, defocus)
    write_npz_arrays(target, arrays)
    return {"source": source, "target": target, "defocus_rad": defocus,
            "overlap_with_the_file_probe": probe_overlap(arrays["probeGuess"], true),
            "diameter_px": probe_diameter(arrays["probeGuess"]), "file_probe_diameter_px": probe_diameter(true)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="PtychoPINN NPZ with probeGuess (the scan's true probe)")
    ap.add_argument("target", help="where to write the copy with the defocused guess")
    ap.add_argument("--defocus", type=float, required=True,
                    help=f"extra pupil phase in radians at {DEFOCUS_RADIUS} cycles/pixel")
    args = ap.parse_args(argv)
    print(json.dumps(write_defocused_scan(args.source, args.target, args.defocus), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
