"""Validate and normalise what a host hands the runtime, with errors that say what was expected.

A detector pipeline can send anything: the wrong crop size, a stack with the
channel axis missing, integer counts, a frame full of NaN after a dropped
packet. Each is caught here, before inference, with the expected value in the
message, so a bad frame never turns into a plausible-looking wrong image.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .geometry import ObjectGrid
from .stitching import MAX_CANVAS_PIXELS

# Neighbouring scan positions further apart than this many frame widths split the scan into pieces that
# share no pixel: in practice one outlier position, or positions in the wrong unit.
MAX_GAP_FRAMES = 4


def _indices(mask: np.ndarray, limit: int = 10) -> str:
    idx = np.flatnonzero(mask)
    return ", ".join(str(int(i)) for i in idx[:limit]) + (" …" if idx.size > limit else "")


def looks_like_counts(x: np.ndarray) -> bool:
    """Whole numbers above 1 everywhere: raw detector counts, not a (normalised or photon) amplitude."""
    return bool(x.size) and float(x.max()) > 1.0 and bool(np.all(x == np.round(x)))


def prepare_diffraction(diffraction: np.ndarray, N: int, channels: int, counts: Optional[bool],
                        intensity_scale: float) -> np.ndarray:
    """→ float32 [n, C, N, N] in photon units (the graphs' input contract).

    ``counts``: True (detector counts: square root taken), False (amplitudes
    in the normalised NPZ units: × ``intensity_scale``) or None (amplitudes,
    but whole-number frames that look like raw counts are refused: read as
    amplitudes they give a noise image). Frames that are all zero or constant
    (a dropped or saturated read-out) are refused with their indices.
    """
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
    flat = x.reshape(x.shape[0], -1)
    constant = flat.min(axis=1) == flat.max(axis=1)
    if constant.any():
        zero = constant & (flat.max(axis=1) == 0)
        what = "all zero" if zero[constant].all() else "all zero or constant"
        raise ValueError(f"{int(constant.sum())} of {x.shape[0]} frame(s) are {what} (indices {_indices(constant)}): "
                         "a dropped, blanked or saturated read-out carries no diffraction. Drop those frames (and "
                         "their positions) before inference")
    if counts is None and looks_like_counts(x):
        raise ValueError(f"the frames hold whole numbers up to {float(x.max()):g}: they look like raw detector counts, "
                         "which read as amplitudes give a noise image. Pass counts=True (CLI: --units counts), or "
                         "counts=False if they really are amplitudes in the normalised units")
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


def check_scan_positions(positions: np.ndarray, N: int, object_shape: Optional[tuple[int, int]] = None,
                         max_canvas_pixels: int = MAX_CANVAS_PIXELS) -> None:
    """Refuse scan positions [n, 2] (x, y) in object pixels that cannot be what the user meant.

    - every position within one pixel of the others (n > 1): metres (or
      another unit) given as pixels, every patch on one spot;
    - neighbouring positions more than ``MAX_GAP_FRAMES`` frame widths apart
      (without an ``object_shape``): one outlier, or a unit mistake, that
      would stretch the canvas over empty space;
    - a canvas (scan extent + one frame) above ``max_canvas_pixels``.

    Each raises ValueError naming the positions and the fix.
    """
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    n = pos.shape[0]
    if n < 2 or not np.all(np.isfinite(pos)):
        return  # nothing to compare (NaN/inf are check_positions' error)
    span = np.ptp(pos, axis=0)
    if float(span.max()) < 1.0:
        raise ValueError(
            f"the {n} scan positions span only {float(span.max()):.3g} pixels, so every patch lands on one spot: "
            "positions must be in object pixels, and these look like metres. Convert them with "
            "ptycho_runtime.positions_from_metres(x_m, y_m, pixel_size_m) (NPZ files: store xcoords/ycoords in "
            "pixels; see docs/data.md)")
    if object_shape is None:
        limit = MAX_GAP_FRAMES * N
        for axis, label in ((0, "x"), (1, "y")):
            order = np.argsort(pos[:, axis], kind="stable")
            gaps = np.diff(pos[order, axis])
            k = int(np.argmax(gaps))
            if gaps[k] > limit:
                low, high = order[: k + 1], order[k + 1:]
                out = low if low.size <= high.size else high
                mask = np.zeros(n, bool)
                mask[out] = True
                first = int(out[0])
                raise ValueError(
                    f"{out.size} of {n} scan position(s) (indices {_indices(mask)}; e.g. x={pos[first, 0]:.6g}, "
                    f"y={pos[first, 1]:.6g}) lie {float(gaps[k]):.6g} pixels in {label} from the rest of the scan, "
                    f"more than {MAX_GAP_FRAMES} frame widths ({limit} px): an outlier or a wrong unit. Drop those "
                    "frames (crop the scan to the region you want), or give object_shape to place them explicitly")
        extent = (span[1] + N + 2) * (span[0] + N + 2)
        if extent > max_canvas_pixels:
            raise ValueError(
                f"the scan spans {span[0]:.6g} × {span[1]:.6g} pixels (x × y): its canvas would hold "
                f"{extent:.3g} pixels, more than the cap of {max_canvas_pixels} ({MAX_CANVAS_PIXELS} by default). "
                "Positions in the wrong unit (nanometres?) look like this; otherwise reconstruct the scan in parts "
                "(crop it into regions) or raise max_canvas_pixels")


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
