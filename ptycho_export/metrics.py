"""Reconstruction quality against a known (simulated) object.

``reconstruction_quality`` compares a stitched ``Reconstruction`` with the
ground-truth object of a simulation:

1. the truth is sampled on the reconstruction's pixel grid (``x_coords`` /
   ``y_coords`` are object-pixel coordinates: column j of the reconstruction
   is object column ``x_coords[j]``); fractional coordinates are sampled
   bilinearly;
2. only covered pixels are compared (``recon.weight > 0``, inside the
   truth), optionally trimmed to the central, well-covered region;
3. the global phase offset, which ptychography cannot determine, is removed:
   φ₀ = angle(Σ truth·conj(recon)) and recon ← recon·exp(iφ₀);
4. amplitude and phase are scored with PSNR and Pearson correlation (the
   phase error is taken as angle(recon·conj(truth)), so it never wraps).

PSNR uses the data range of the truth inside the mask as the peak
(amplitude: max |truth|; phase: max − min of the truth phase), so it is
comparable between objects of the same kind.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["reconstruction_quality", "sample_object"]


def sample_object(obj: np.ndarray, x_coords: np.ndarray, y_coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinearly sample ``obj`` at rows ``y_coords`` × columns ``x_coords``.

    Returns ``(values [len(y), len(x)] complex128, inside [len(y), len(x)] bool)``;
    points outside the object are 0 with ``inside`` False.
    """
    obj = np.asarray(obj)
    if obj.ndim != 2:
        raise ValueError(f"the truth object must be 2-D (rows, cols); got shape {obj.shape}")
    H, W = obj.shape
    x = np.asarray(x_coords, dtype=np.float64).reshape(-1)
    y = np.asarray(y_coords, dtype=np.float64).reshape(-1)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    in_x = (x >= 0) & (x <= W - 1)
    in_y = (y >= 0) & (y <= H - 1)
    out = np.zeros((y.size, x.size), dtype=np.complex128)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        rows = np.clip(y0 + dy, 0, H - 1)
        for dx, wx in ((0, 1 - fx), (1, fx)):
            cols = np.clip(x0 + dx, 0, W - 1)
            out += (wy[:, None] * wx[None, :]) * obj[rows[:, None], cols[None, :]]
    return out, in_y[:, None] & in_x[None, :]


def _psnr(err: np.ndarray, peak: float) -> float:
    mse = float(np.mean(np.abs(err) ** 2))
    if mse == 0.0:
        return math.inf
    if peak <= 0:
        return -math.inf
    return 10.0 * math.log10(peak * peak / mse)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))
    if denom == 0.0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(np.sum(a * b) / denom)


def reconstruction_quality(recon: Any, truth_object: np.ndarray, border: int = 0,
                           min_weight: float = 0.0) -> dict[str, Any]:
    """Amplitude/phase PSNR (dB) and correlation of ``recon`` vs ``truth_object``.

    Args:
        recon: a ``Reconstruction`` (``object``, ``weight``, ``x_coords``, ``y_coords``).
        truth_object: complex ground-truth object in the scan's object-pixel frame.
        border: trim this many pixels from every side of the covered region's
            bounding box (the central, well-covered region; 0 = all covered pixels).
        min_weight: keep only pixels whose stitching weight exceeds this.

    Returns a dict of plain Python numbers: ``n_pixels``, ``phase_offset_rad``
    (the removed global offset), ``amplitude_psnr_db``, ``phase_psnr_db``,
    ``amplitude_correlation``, ``phase_correlation``, ``amplitude_rmse``,
    ``phase_rmse_rad``.
    """
    obj = np.asarray(recon.object)
    weight = np.asarray(recon.weight, dtype=np.float64)
    if obj.shape != weight.shape:
        raise ValueError(f"reconstruction object {obj.shape} and weight {weight.shape} differ in shape")
    if border < 0:
        raise ValueError(f"border must be >= 0 (got {border})")
    truth, inside = sample_object(truth_object, recon.x_coords, recon.y_coords)
    mask = (weight > max(float(min_weight), 0.0)) & inside
    if border and mask.any():
        rows, cols = np.nonzero(mask)
        box = np.zeros_like(mask)
        r0, r1 = rows.min() + border, rows.max() - border
        c0, c1 = cols.min() + border, cols.max() - border
        if r1 >= r0 and c1 >= c0:
            box[r0:r1 + 1, c0:c1 + 1] = True
        mask &= box
    n = int(mask.sum())
    if n == 0:
        raise ValueError("no reconstructed pixel overlaps the truth object (check the coordinate frames, "
                         "or use a smaller border / min_weight)")
    t = truth[mask]
    r = obj[mask].astype(np.complex128)
    offset = float(np.angle(np.sum(t * np.conj(r))))
    r = r * np.exp(1j * offset)
    amp_t, amp_r = np.abs(t), np.abs(r)
    phase_t = np.angle(t)
    phase_err = np.angle(r * np.conj(t))  # wrapped difference, in (-π, π]
    phase_r = phase_t + phase_err  # the aligned recon phase, unwrapped next to the truth
    phase_range = float(phase_t.max() - phase_t.min())
    return {
        "n_pixels": n,
        "phase_offset_rad": offset,
        "amplitude_psnr_db": _psnr(amp_r - amp_t, float(amp_t.max())),
        "phase_psnr_db": _psnr(phase_err, phase_range),
        "amplitude_correlation": _correlation(amp_r, amp_t),
        "phase_correlation": _correlation(phase_r, phase_t),
        "amplitude_rmse": float(np.sqrt(np.mean((amp_r - amp_t) ** 2))),
        "phase_rmse_rad": float(np.sqrt(np.mean(phase_err ** 2))),
    }
