"""Validate and normalise what a host hands the runtime, with errors that say what was expected.

A detector pipeline can send anything: the wrong crop size, a stack with the
channel axis missing, integer counts, a frame full of NaN after a dropped
packet. Each is caught here, before inference, with the expected value in the
message, so a bad frame never turns into a plausible-looking wrong image.
"""

from __future__ import annotations

import numpy as np


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
                          object_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Scan positions in metres → (x, y) object pixels, [n, 2].

    With ``object_shape`` (H, W) the ptychodus convention is used: position
    (0 m, 0 m) is the object centre, pixel ((W−1)/2, (H−1)/2). Without it,
    positions are relative to the scan's minimum plus nothing else (the
    runtime then sizes the canvas to the scan).
    """
    px, py = (pixel_size_m, pixel_size_m) if np.isscalar(pixel_size_m) else pixel_size_m
    if not (px > 0 and py > 0):
        raise ValueError(f"pixel_size_m must be > 0 (got {pixel_size_m!r})")
    x = np.asarray(x_m, dtype=np.float64) / px
    y = np.asarray(y_m, dtype=np.float64) / py
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x_m and y_m must be 1-D arrays of equal length (got {x.shape} and {y.shape})")
    if object_shape is not None:
        H, W = object_shape
        x, y = x + (W - 1) / 2, y + (H - 1) / 2
    else:
        x, y = x - x.min(), y - y.min()
    return np.stack([x, y], axis=1)
