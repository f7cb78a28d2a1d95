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

from .overlap_solve import solve_overlap_planes
from .stitching import MAX_CANVAS_PIXELS, Reconstruction, StitchCanvas, _window, stitch_patches

DEFAULT_PHASE_ITERATIONS = 20  # passes when alignment is asked for (Bundle.reconstruct(align_phase=...))
# the least-squares overlap solve (overlap_solve): one phase offset, or offset and ramp, per pattern or per group
ALIGN_MODES = ("none", "offsets", "ramps", "group-offsets", "group-ramps")


def _binned(patches: np.ndarray, positions: np.ndarray, window: Optional[np.ndarray], crop: Optional[int],
            factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patches averaged over factor×factor blocks (weighted by the window), their positions and window.

    The relative phase of two patches is a low-resolution quantity, so it is
    measured on binned patches: ``factor``² times less work per pass. Keep
    the factor small (2): binning averages e^{iφ} over the block, and with
    steep phase (≳ 0.3 rad/px) coarser blocks bias the estimate (measured:
    a drifting phase ramp at factor 4 on a test object with 0.25 rad/px).
    """
    n, N, _ = patches.shape
    w = _window(N, crop, window)
    M = N // factor
    wb = w.reshape(M, factor, M, factor)
    w_sum = wb.sum(axis=(1, 3))
    summed = (patches.reshape(n, M, factor, M, factor) * wb[None]).sum(axis=(2, 4))
    binned = summed / np.where(w_sum > 0, w_sum, 1.0)[None]
    # binned pixel R of a frame sits at binned object coordinate (y − (N−1)/2)/factor + R
    pos = (positions - (N - 1) / 2) / factor + (M - 1) / 2
    return binned, pos, w_sum


def align_patch_phases(patches: np.ndarray, positions: np.ndarray, window: Optional[np.ndarray] = None,
                       iterations: int = DEFAULT_PHASE_ITERATIONS, crop: Optional[int] = None,
                       bin_factor: int = 2) -> np.ndarray:
    """Unit phase factors [n] that make overlapping patches [n, N, N] at positions [n, 2] agree.

    Multiply patch k by the k-th factor before stitching. ``window`` (e.g.
    |probe|²) or ``crop`` weights the comparison as it weights the stitching.
    The comparison runs on patches binned by ``bin_factor`` (1: full resolution).
    """
    patches = np.asarray(patches)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if patches.ndim != 3 or patches.shape[0] != pos.shape[0]:
        raise ValueError(f"patches [n, N, N] and positions [n, 2] must match (got {list(patches.shape)} and "
                         f"{list(pos.shape)})")
    if isinstance(iterations, bool) or int(iterations) < 0:
        raise ValueError(f"iterations must be an integer >= 0 (got {iterations!r})")
    N = patches.shape[-1]
    if isinstance(bin_factor, bool) or int(bin_factor) < 1 or N % int(bin_factor):
        raise ValueError(f"bin_factor must be a positive divisor of N={N} (got {bin_factor!r})")
    factors = np.ones(patches.shape[0], np.complex128)
    if patches.shape[0] < 2 or not iterations:
        return factors
    small, small_pos, small_w = _binned(patches, pos, window, crop, int(bin_factor))
    M = small.shape[-1]
    template = StitchCanvas.for_positions(small_pos, M, window=small_w)
    values, w = template.window_values(small)
    weighted_conj = np.conj(values) * w[None, :]
    for _ in range(int(iterations)):
        canvas = StitchCanvas(template.shape, M, template.origin, window=small_w)
        canvas.add(small * factors[:, None, None], small_pos)
        overlap = np.sum(canvas.sample(small_pos) * weighted_conj, axis=1)
        mag = np.abs(overlap)
        factors = np.where(mag > 0, overlap / np.where(mag > 0, mag, 1.0), factors)
    return factors


def check_align(align: str) -> None:
    """ValueError unless ``align`` is one of ``ALIGN_MODES``."""
    if align not in ALIGN_MODES:
        raise ValueError(f"align must be one of {', '.join(map(repr, ALIGN_MODES))} (got {align!r})")


def overlap_factors(patches: np.ndarray, positions: np.ndarray, align: str, window: Optional[np.ndarray] = None,
                    crop: Optional[int] = None) -> np.ndarray:
    """Complex factors [n·C, N, N] from the least-squares overlap solve for patches [n, (C,) N, N] (``align`` mode).

    "offsets"/"ramps": a phase offset (or offset and ramp) per pattern;
    "group-…": one per group of C patches (one network call). "none": ones.
    """
    check_align(align)
    patches = np.asarray(patches)
    N = patches.shape[-1]
    flat = patches.reshape(-1, N, N)
    if align == "none":
        return np.ones((flat.shape[0], 1, 1), np.complex64)
    flat_pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    per_group = align.startswith("group-")
    C = int(np.prod(patches.shape[1:-2])) if patches.ndim > 3 else 1
    groups = np.repeat(np.arange(flat.shape[0] // C), C) if per_group else None
    planes = solve_overlap_planes(flat, flat_pos, window=window, crop=crop, groups=groups,
                                  model=align.removeprefix("group-"))
    return planes.factors(flat_pos, N)


def stitch_scan(patches: np.ndarray, positions: np.ndarray, window: Optional[np.ndarray] = None,
                crop: Optional[int] = None, align_phase: int = 0,
                object_shape: Optional[tuple[int, int]] = None, max_pixels: int = MAX_CANVAS_PIXELS,
                align: str = "none") -> Reconstruction:
    """Phase-align and stitch patches [n, (C,) N, N] at positions [n, (C,) 2].

    Alignment: ``align`` (``ALIGN_MODES``), the least-squares overlap solve,
    or ``align_phase`` passes of the iterative synchronisation (0: off); not
    both. The one stitching path of ``Bundle.reconstruct`` and training's test
    reconstruction. The canvas is sized to the scan, or is ``object_shape``
    with origin (0, 0); one above ``max_pixels`` is refused.
    """
    patches = np.asarray(patches)
    N = patches.shape[-1]
    flat = patches.reshape(-1, N, N)
    flat_pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if align_phase and align != "none":
        raise ValueError(f"give align={align!r} (the least-squares solve) or align_phase={align_phase} (iterative "
                         "passes), not both")
    check_align(align)
    if align != "none":
        flat = flat * overlap_factors(patches, positions, align, window=window, crop=crop)
    if align_phase:
        factors = align_patch_phases(flat, flat_pos, window=window, crop=crop, iterations=align_phase)
        flat = flat * factors[:, None, None].astype(np.complex64)
    return stitch_patches(flat, flat_pos, object_shape=object_shape, crop=crop, window=window,
                          max_pixels=max_pixels)
