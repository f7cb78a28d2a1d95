"""Align the constant phase of overlapping patches before they are averaged.

One diffraction pattern says nothing about the absolute phase of the object
patch that made it: ψ and ψ·e^{iφ} scatter identically. A network that maps
one pattern (or one group of gridsize² patterns) to a patch can therefore only
guess that constant from its training prior, and the guesses of neighbouring
patches disagree; averaging them washes the phase out ("per-patch phase
offsets scatter 0.44 rad" in the fidelity study). Ptychography's own answer
is overlap: neighbouring patches see the same object, so their relative
phase is measurable where they overlap.

``align_patch_phases`` finds one unit factor per patch by synchronisation:
stitch, read the stitched object back under each patch's window, take the
phase of Σ w·object·conj(patch) as the patch's new offset, repeat. Each pass
is one stitch and one read-back (vectorised, O(n·K)). The overall phase of
the result stays arbitrary, as in any ptychographic reconstruction.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .stitching import StitchCanvas

DEFAULT_PHASE_ITERATIONS = 30


def align_patch_phases(patches: np.ndarray, positions: np.ndarray, window: Optional[np.ndarray] = None,
                       iterations: int = DEFAULT_PHASE_ITERATIONS, crop: Optional[int] = None) -> np.ndarray:
    """Unit phase factors [n] that make overlapping patches [n, N, N] at positions [n, 2] agree.

    Multiply patch k by the k-th factor before stitching. ``window`` (e.g.
    |probe|²) weights the comparison as it weights the stitching.
    """
    patches = np.asarray(patches)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if patches.ndim != 3 or patches.shape[0] != pos.shape[0]:
        raise ValueError(f"patches [n, N, N] and positions [n, 2] must match (got {list(patches.shape)} and "
                         f"{list(pos.shape)})")
    if isinstance(iterations, bool) or int(iterations) < 0:
        raise ValueError(f"iterations must be an integer >= 0 (got {iterations!r})")
    N = patches.shape[-1]
    factors = np.ones(patches.shape[0], np.complex128)
    if patches.shape[0] < 2:
        return factors
    template = StitchCanvas.for_positions(pos, N, crop=crop, window=window)
    values, w = template.window_values(patches)
    weighted_conj = np.conj(values) * w[None, :]
    for _ in range(int(iterations)):
        canvas = StitchCanvas(template.shape, N, template.origin, crop=crop, window=window)
        canvas.add(patches * factors[:, None, None].astype(np.complex64), pos)
        overlap = np.sum(canvas.sample(pos) * weighted_conj, axis=1)
        mag = np.abs(overlap)
        factors = np.where(mag > 0, overlap / np.where(mag > 0, mag, 1.0), factors)
    return factors
