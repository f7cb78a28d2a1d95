"""Validate and normalise what a host hands the runtime, with errors that say what was expected.

A detector pipeline can send anything: the wrong crop size, a stack with the
channel axis missing, integer counts, a frame full of NaN after a dropped
packet. Each is caught here, before inference, with the expected value in the
message, so a bad frame never turns into a plausible-looking wrong image.
"""

from __future__ import annotations

import numpy as np

from .geometry import ObjectGrid


def prepare_diffraction(diffraction: np.ndarray, N: int, channels: int, counts: bool,
                        intensity_scale: float) -> np.ndarray:
    """→ float32 [n, C, N, N] in photon units (the graphs' input contract)."""
    d = np.asarray(diffraction)
    expected = f"[n, {channels}, {N}, {N}]" + (f" or [n, {N}, {N}]" if channels == 1 else "")
    if d.dtype.kind not in "fiu":
        raise TypeError(f"diffraction must be a real float or integer array (got dtype {d.dtype}); "
                        "pass amplitudes (or counts with counts=True), not complex fields")
    if d.ndim == 3 and channels == 1:
        d = d[:, None]
    if d.ndim != 4 or d.shape[1] != channels or d.shape[2:] != (N, N):
        hint = ""
        if d.ndim == 4 and d.shape[2:] != (N, N):
            hint = f" (this bundle's model was trained with N={N}: crop or bin the frames to {N}×{N})"
        elif d.ndim == 4:
            hint = f" (C = gridsize² = {channels} for this bundle)"
        raise ValueError(f"diffraction must have shape {expected}, got {list(d.shape)}{hint}")
    if d.shape[0] == 0:
        raise ValueError("diffraction holds no frames (n = 0)")
    x = d.astype(np.float32, copy=True)
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(x.shape[0], -1).all(axis=1))
        raise ValueError(f"{bad.size} frame(s) contain NaN or inf (first: index {int(bad[0])}); drop or repair "
                         "them before inference")
    if (x < 0).any():
        bad = np.flatnonzero((x < 0).reshape(x.shape[0], -1).any(axis=1))
        what = "counts" if counts else "amplitudes"
        raise ValueError(f"{bad.size} frame(s) have negative {what} (first: index {int(bad[0])}); subtract the "
                         "dark/background with clipping at 0 before inference")
    if counts:
        np.sqrt(x, out=x)
    else:
        x *= np.float32(intensity_scale)
    return x


def check_positions(positions: np.ndarray, n: int, channels: int) -> np.ndarray:
    """→ float64 [n, C, 2] (x, y) in object pixels."""
    pos = np.asarray(positions)
    if pos.dtype.kind not in "fiu":
        raise TypeError(f"positions must be a real numeric array (got dtype {pos.dtype})")
    pos = pos.astype(np.float64)
    if channels == 1 and pos.shape == (n, 2):
        pos = pos[:, None, :]
    if pos.shape != (n, channels, 2):
        expected = f"[{n}, 2]" if channels == 1 else f"[{n}, {channels}, 2] (or [{n}, 2] with frames [{n}, N, N])"
        raise ValueError(f"positions must have shape {expected} as (x, y) in object pixels, one per frame "
                         f"(got {list(pos.shape)})")
    if not np.all(np.isfinite(pos)):
        raise ValueError("positions contain NaN or inf")
    return pos


def positions_from_metres(x_m: np.ndarray, y_m: np.ndarray, pixel_size_m: float | tuple[float, float],
                          object_shape: tuple[int, int] | None = None,
                          centre_m: tuple[float, float] | None = (0.0, 0.0)) -> np.ndarray:
    """Scan positions in metres → (x, y) object pixels, [n, 2].

    With ``object_shape`` (H, W) the ptychodus convention is used
    (``ObjectGrid``): ``centre_m`` (x, y) — the object's centre in stage
    coordinates, default (0, 0); None: the middle of the scan's extent — is
    object pixel ((W−1)/2, (H−1)/2). Without it, positions are relative to the
    scan's minimum (the runtime then sizes the canvas to the scan).
    """
    x = np.asarray(x_m, dtype=np.float64)
    y = np.asarray(y_m, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x_m and y_m must be 1-D arrays of equal length (got {x.shape} and {y.shape})")
    pos = np.stack([x, y], axis=1)
    if object_shape is None:
        grid = ObjectGrid(None, pixel_size_m)
        px = grid.to_pixels(pos)
        return px - px.min(axis=0) if px.shape[0] else px
    if centre_m is None:
        centre_m = ((x.min() + x.max()) / 2, (y.min() + y.max()) / 2) if x.size else (0.0, 0.0)
    return ObjectGrid(tuple(object_shape), pixel_size_m, tuple(centre_m)).to_pixels(pos)


def repair_bad_pixels(x: np.ndarray, bad_pixels: np.ndarray | None) -> np.ndarray:
    """Fill the detector's bad pixels (True in ``bad_pixels`` [N, N]) of frames [..., N, N] in place.

    Why fill rather than zero: the network was trained on complete frames, so a
    dead pixel set to 0 reads as "no photons here" and a hot one as a bright
    speckle. Each bad pixel gets the mean of its good (or already filled)
    3×3 neighbours, from the outside of a bad region inwards, so a beam-stop
    shadow is filled smoothly. Only the bad pixels are touched (O(frames ×
    bad pixels)), so a mask costs little per call.
    """
    if bad_pixels is None:
        return x
    mask = np.asarray(bad_pixels)
    if mask.shape != x.shape[-2:] or mask.dtype.kind not in "biu":
        raise ValueError(f"bad_pixels must be a boolean [{x.shape[-2]}, {x.shape[-1]}] mask (True = bad) matching "
                         f"the frames (got {mask.dtype} {list(mask.shape)})")
    bad = mask.astype(bool)
    if not bad.any():
        return x
    if bad.all():
        raise ValueError("bad_pixels marks every detector pixel as bad; nothing is left to reconstruct from")
    H, W = bad.shape
    todo = bad.copy()
    while todo.any():
        rows, cols = np.nonzero(todo)
        total = np.zeros(x.shape[:-2] + (rows.size,), np.float64)
        count = np.zeros(rows.size)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                r, c = rows + dr, cols + dc
                ok = (r >= 0) & (r < H) & (c >= 0) & (c < W)
                r, c = np.where(ok, r, 0), np.where(ok, c, 0)
                use = ok & ~todo[r, c]
                total += np.where(use, x[..., r, c], 0.0)
                count += use
        ready = count > 0  # pixels with at least one known neighbour are filled in this pass
        x[..., rows[ready], cols[ready]] = (total[..., ready] / count[ready]).astype(x.dtype)
        todo[rows[ready], cols[ready]] = False
    return x
