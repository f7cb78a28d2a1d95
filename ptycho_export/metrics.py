"""Reconstruction quality against a known (simulated) object: the one scoring of the project.

``ptycho_export.evaluate.score_reconstruction`` (used by ``ptycho-export
evaluate`` and by the training report) is built from these functions. They
work on two complex images on the same pixel grid (the reconstruction and
the truth sampled on it, ``sample_object``) plus a boolean mask of the
scanned area (``scanned_mask``), and they follow one order: register
(sub-pixel), remove the global phase, score (RMSE/PSNR/SSIM with
scikit-image, and the Fourier ring correlation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

__all__ = ["sample_object", "Alignment", "FRC_THRESHOLD", "align_to_truth", "bounding_box",
           "DEFAULT_MAX_SHIFT_PX", "fourier_ring_correlation", "frc_resolution", "global_phase_offset", "image_quality",
           "register",
           "scanned_mask", "shift_image", "soft_window"]


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


# --------------------------------------------------------------------------- evaluation against the truth
#
# The functions below are what ``ptycho-export evaluate`` scores with. They
# work on two complex images on the same pixel grid (the reconstruction and
# the truth sampled on it) plus a boolean mask of the scanned area, and they
# follow one order: register (sub-pixel), remove the global phase, score.
# Library code is used where it exists (scikit-image's registration, PSNR and
# SSIM; scipy's shift); only the Fourier ring correlation is written here,
# because scikit-image has none.

FRC_THRESHOLD = 1.0 / 7.0
"""The fixed 1/7 threshold (Rosenthal & Henderson 2003), as used in ptychography papers."""


@dataclass
class Alignment:
    """A reconstruction registered to the truth.

    ``recon`` is the reconstruction after the sub-pixel ``shift_px`` (rows,
    cols: what was applied to it), the global phase factor
    exp(i·``phase_offset_rad``) and the global amplitude factor
    ``amplitude_scale`` (1.0 when not removed) and the linear phase ramp
    ``phase_ramp_rad_per_px`` (rows, cols; zero when not removed); ``truth`` the truth on the same grid;
    ``mask`` the pixels that are scored (scanned, inside the truth, valid
    after the shift); ``box`` the (row, col) slices of the mask's bounding box.
    ``found_shift_px`` is what the registration found; it is applied only
    when within ``max_shift_px`` (a larger "shift" means the images do not
    correlate, e.g. an untrained network, and applying it would only move the
    scored region).
    """

    recon: np.ndarray
    truth: np.ndarray
    mask: np.ndarray
    shift_px: tuple[float, float]
    phase_offset_rad: float
    box: tuple[slice, slice]
    found_shift_px: tuple[float, float] = (0.0, 0.0)
    amplitude_scale: float = 1.0
    phase_ramp_rad_per_px: tuple[float, float] = (0.0, 0.0)


def scanned_mask(weight: np.ndarray, inside: np.ndarray, min_weight_fraction: float = 0.2,
                 level: Optional[float] = None) -> np.ndarray:
    """Pixels whose weight is ≥ ``min_weight_fraction`` × ``level``, inside the truth.

    ``level`` defaults to the weight's maximum; ``evaluate`` passes the peak
    intensity of ONE probe exposure, max |P|², with ``weight`` the
    illumination Σ|P|² over positions, so "scanned" means "lit by at least
    that fraction of one exposure's peak" whatever the scan density (relative
    to the maximum, a random scan's sparse parts would drop out). The scan's
    edge is reached by the dim tails of the probe only; such pixels are
    undetermined for any method, so scoring them would measure the probe,
    not the reconstruction.
    """
    if not 0.0 <= min_weight_fraction < 1.0:
        raise ValueError(f"min_weight_fraction must be in [0, 1) (got {min_weight_fraction})")
    w = np.asarray(weight, dtype=np.float64)
    top = (float(w.max()) if w.size else 0.0) if level is None else float(level)
    if top <= 0:
        return np.zeros(w.shape, dtype=bool)
    return (w > 0) & (w >= min_weight_fraction * top) & np.asarray(inside, dtype=bool)


def bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    """(row, col) slices of the smallest rectangle holding every True pixel of ``mask``."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("the mask is empty: no scanned pixel overlaps the truth object")
    return slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1)


def soft_window(mask: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """A smooth [0, 1] apodisation inside ``mask``: eroded by 2σ, then Gaussian-blurred.

    Used by the registration and the FRC: a hard mask edge is shared by both
    images and would correlate them at every frequency (biasing the shift to
    0 and the FRC to 1); a smooth edge has no high-frequency content.
    """
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    k = int(math.ceil(2 * sigma))
    core = ndimage.binary_erosion(m, iterations=k) if k > 0 else m
    if not core.any():  # a tiny region: keep what there is
        core = m
    return ndimage.gaussian_filter(core.astype(np.float64), sigma) * m


def _weighted_centred(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    mean = np.sum(img * w) / max(float(np.sum(w)), 1e-300)
    return (img - mean) * w


def register(truth: np.ndarray, recon: np.ndarray, mask: np.ndarray, upsample_factor: int = 100) -> tuple[float, float]:
    """Sub-pixel shift (rows, cols) that moves ``recon`` onto ``truth`` (skimage phase_cross_correlation).

    Both complex images are cut to the mask's bounding box, centred on their
    weighted mean and apodised with ``soft_window`` (so neither the box edge
    nor the shared mask pulls the peak to zero shift). The cross-correlation
    magnitude is used, so a global phase offset does not matter. Precision is
    1/``upsample_factor`` pixel.
    """
    from skimage.registration import phase_cross_correlation

    if upsample_factor < 1:
        raise ValueError(f"upsample_factor must be >= 1 (got {upsample_factor})")
    box = bounding_box(mask)
    w = soft_window(mask[box])
    t = _weighted_centred(np.asarray(truth, dtype=np.complex128)[box], w)
    r = _weighted_centred(np.asarray(recon, dtype=np.complex128)[box], w)
    if not np.any(np.abs(r) > 0) or not np.any(np.abs(t) > 0):
        return 0.0, 0.0
    shift, _, _ = phase_cross_correlation(t, r, upsample_factor=int(upsample_factor), normalization="phase")
    return float(shift[0]), float(shift[1])


def shift_image(img: np.ndarray, shift: tuple[float, float], order: int = 3) -> np.ndarray:
    """``img`` (real or complex) moved by ``shift`` (rows, cols) pixels with scipy's spline interpolation."""
    from scipy import ndimage

    img = np.asarray(img)
    if np.iscomplexobj(img):
        return (ndimage.shift(img.real, shift, order=order, mode="nearest")
                + 1j * ndimage.shift(img.imag, shift, order=order, mode="nearest"))
    return ndimage.shift(img, shift, order=order, mode="nearest")


def global_phase_offset(truth: np.ndarray, recon: np.ndarray, mask: np.ndarray) -> float:
    """φ₀ = angle(Σ truth·conj(recon)) over ``mask``: recon·exp(iφ₀) best matches the truth (least squares)."""
    return float(np.angle(np.sum(truth[mask] * np.conj(recon[mask]))))


def global_amplitude_scale(truth: np.ndarray, recon: np.ndarray, mask: np.ndarray) -> float:
    """s = Σ|truth|·|recon| / Σ|recon|² over ``mask``: s·|recon| best fits |truth| (least squares); 1 for 0."""
    a_r = np.abs(recon[mask])
    denom = float(np.sum(a_r**2))
    return float(np.sum(np.abs(truth[mask]) * a_r)) / denom if denom > 0 else 1.0


def linear_phase_ramp(truth: np.ndarray, recon: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(k_rows, k_cols) in rad/px: recon·exp(i(k_rows·row + k_cols·col)) best matches the truth's phase over ``mask``.

    Coarse from the peak of the zero-padded spectrum of truth·conj(recon)
    (the ramp that best aligns the two, as a cross-correlation finds a
    shift), then refined by least squares on the phase left after it.
    """
    z = np.where(mask, truth * np.conj(recon), 0)
    z = z / np.maximum(np.abs(z), 1e-30) * mask  # unit weights: the ramp, not the brightest pixels
    pad = [2 * n for n in z.shape]
    spectrum = np.abs(np.fft.fft2(z, s=pad))
    kr, kc = np.unravel_index(int(np.argmax(spectrum)), spectrum.shape)
    k = np.array([2 * np.pi * (np.fft.fftfreq(pad[0])[kr]), 2 * np.pi * (np.fft.fftfreq(pad[1])[kc])])
    rows, cols = np.nonzero(mask)
    left = np.angle(z[rows, cols] * np.exp(-1j * (k[0] * rows + k[1] * cols)))
    design = np.stack([rows, cols, np.ones_like(rows)], axis=1).astype(np.float64)
    fine, *_ = np.linalg.lstsq(design, left, rcond=None)
    return float(k[0] + fine[0]), float(k[1] + fine[1])


DEFAULT_MAX_SHIFT_PX = 4.0
"""Registration corrects small misplacements (sub-pixel conventions, a pixel or two); larger "shifts" are rejected."""


def align_to_truth(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray, register_shift: bool = True,
                   upsample_factor: int = 100, max_shift_px: float = DEFAULT_MAX_SHIFT_PX,
                   remove_amplitude_scale: bool = True, remove_phase_ramp: bool = False) -> Alignment:
    """Register ``recon`` to ``truth`` (sub-pixel), then remove the global phase and amplitude scale.

    The shift is applied to the reconstruction (cubic spline on real and
    imaginary parts) when both components are within ``max_shift_px``;
    pixels whose source lay outside ``mask`` leave the mask, so only pixels
    that were scanned both before and after the shift are scored.

    Ptychography determines the object up to one complex constant: its phase
    always, and its amplitude whenever the probe's absolute scale is not
    known (the data fix only the product P·O, and files write probes at an
    arbitrary scale, which the reader sets by assuming the brightest frames
    see transmission 1: docs/data.md). Like Fienup's invariant error metric,
    the scoring therefore removes both (``remove_amplitude_scale=False``
    keeps the amplitude as reconstructed, for a probe known in absolute units).

    ``remove_phase_ramp`` also removes a linear phase ramp: when the probe
    was reconstructed too, O·exp(ik·r) with P·exp(−ik·r) gives every pattern
    unchanged (a constant phase per exit wave), so the data cannot fix it
    (blind ptychography's ramp ambiguity); with a known probe they do, and
    a ramp is an error.
    """
    recon = np.asarray(recon, dtype=np.complex128)
    truth = np.asarray(truth, dtype=np.complex128)
    mask = np.asarray(mask, dtype=bool)
    if recon.shape != truth.shape or mask.shape != recon.shape:
        raise ValueError(f"recon {recon.shape}, truth {truth.shape} and mask {mask.shape} must share one grid")
    bounding_box(mask)  # raises on an empty mask
    found = register(truth, recon, mask, upsample_factor) if register_shift else (0.0, 0.0)
    shift = found if max(abs(found[0]), abs(found[1])) <= max_shift_px else (0.0, 0.0)
    if shift != (0.0, 0.0):
        recon = shift_image(recon, shift)
        moved = shift_image(mask.astype(np.float64), shift, order=1) > 0.999
        if (mask & moved).any():
            mask = mask & moved
    ramp = linear_phase_ramp(truth, recon, mask) if remove_phase_ramp else (0.0, 0.0)
    if remove_phase_ramp:
        rows, cols = np.indices(recon.shape)
        recon = recon * np.exp(1j * (ramp[0] * rows + ramp[1] * cols))
    offset = global_phase_offset(truth, recon, mask)
    scale = global_amplitude_scale(truth, recon, mask) if remove_amplitude_scale else 1.0
    return Alignment(recon=recon * (scale * np.exp(1j * offset)), truth=truth, mask=mask, shift_px=shift,
                     phase_offset_rad=offset, box=bounding_box(mask), found_shift_px=found, amplitude_scale=scale,
                     phase_ramp_rad_per_px=ramp)


def _data_range(values: np.ndarray, fallback: float) -> float:
    """max − min of the truth, or ``fallback`` when the truth is (nearly) constant."""
    rng = float(np.ptp(values)) if values.size else 0.0
    return rng if rng > 1e-9 * max(float(np.max(np.abs(values))) if values.size else 0.0, 1.0) else float(fallback)


def _psnr_db(truth: np.ndarray, test: np.ndarray, data_range: float) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(truth, test):
        return math.inf  # skimage divides by zero here
    return float(peak_signal_noise_ratio(truth, test, data_range=data_range))


def _ssim(truth: np.ndarray, test: np.ndarray, mask: np.ndarray, data_range: float) -> float:
    """Mean SSIM over ``mask`` (skimage defaults: 7×7 uniform window; explicit data_range) on the mask's box."""
    from skimage.metrics import structural_similarity

    box = bounding_box(mask)
    t, r, m = truth[box], test[box], mask[box]
    if min(t.shape) < 7:
        raise ValueError(f"the scanned region ({t.shape[0]}×{t.shape[1]} px) is too small for SSIM (7×7 window)")
    _, smap = structural_similarity(t, r, data_range=data_range, full=True)
    return float(np.mean(smap[m]))


def fourier_ring_correlation(a: np.ndarray, b: np.ndarray, window: Optional[np.ndarray] = None
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fourier ring correlation of two (complex or real) images of one shape.

    FRC(r) = Re Σ_{|k|∈ring r} A(k)·B*(k) / sqrt(Σ|A(k)|² · Σ|B(k)|²), with A, B
    the 2-D FFTs of the images after removing their (weighted) mean and
    multiplying by ``window`` (default: none). Rings are one frequency bin wide,
    bin = 1/min(H, W) cycles per pixel, from 0 up to Nyquist (0.5). The real
    part (not the modulus) is used, so independent noise averages to 0 instead
    of a positive bias of ~1/√(ring size); identical images give exactly 1.

    Returns ``(frequency [cycles/pixel] at each ring centre, frc, pixels per ring)``;
    rings with no power in either image get FRC = nan.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"FRC needs two 2-D images of one shape (got {a.shape} and {b.shape})")
    w = np.ones(a.shape) if window is None else np.asarray(window, dtype=np.float64)
    A = np.fft.fft2(_weighted_centred(a.astype(np.complex128), w))
    B = np.fft.fft2(_weighted_centred(b.astype(np.complex128), w))
    H, W = a.shape
    fy, fx = np.fft.fftfreq(H), np.fft.fftfreq(W)
    radius = np.hypot(fy[:, None], fx[None, :])
    step = 1.0 / min(H, W)
    ring = np.floor(radius / step + 0.5).astype(np.int64).ravel()  # ring k holds |f| in [(k−½)·step, (k+½)·step)
    n_rings = int(np.floor(0.5 / step + 0.5)) + 1
    keep = ring < n_rings
    ring = ring[keep]
    cross = np.bincount(ring, (A * np.conj(B)).real.ravel()[keep], n_rings)
    pa = np.bincount(ring, (np.abs(A) ** 2).ravel()[keep], n_rings)
    pb = np.bincount(ring, (np.abs(B) ** 2).ravel()[keep], n_rings)
    count = np.bincount(ring, minlength=n_rings)
    with np.errstate(invalid="ignore", divide="ignore"):
        frc = cross / np.sqrt(pa * pb)
    frc[(pa == 0) | (pb == 0)] = np.nan
    return np.arange(n_rings) * step, frc, count


def frc_resolution(freqs: np.ndarray, frc: np.ndarray, threshold: float = FRC_THRESHOLD) -> dict[str, Any]:
    """Where the FRC first falls below ``threshold`` (ring 0, the mean, is skipped).

    The crossing frequency is interpolated linearly between rings. Returns
    ``frequency`` (cycles/pixel), ``resolution_px`` (its inverse: the finest
    period resolved, ≥ 2 px) and ``reaches_nyquist`` (True when the FRC stays
    above the threshold up to 0.5 cycles/pixel; resolution is then 2 px, the
    sampling limit).
    """
    f = np.asarray(freqs, dtype=np.float64)
    c = np.asarray(frc, dtype=np.float64)
    for k in range(1, f.size):
        if np.isfinite(c[k]) and c[k] < threshold:
            f0, c0 = f[k - 1], c[k - 1]
            cross = f[k] if not np.isfinite(c0) or c0 == c[k] else f0 + (c0 - threshold) / (c0 - c[k]) * (f[k] - f0)
            cross = max(float(cross), float(f[1]) if f.size > 1 else float(cross))
            return {"frequency": cross, "resolution_px": 1.0 / cross, "reaches_nyquist": False}
    return {"frequency": 0.5, "resolution_px": 2.0, "reaches_nyquist": True}


def image_quality(alignment: Alignment, frc_threshold: float = FRC_THRESHOLD) -> dict[str, Any]:
    """Amplitude and phase RMSE, PSNR and SSIM, and the FRC resolution, of an aligned reconstruction.

    - phase error = angle(recon·conj(truth)) (never wraps); the recon phase
      compared by PSNR/SSIM is truth phase + that error, i.e. unwrapped next
      to the truth;
    - data_range (PSNR peak and SSIM's L) = max − min of the truth in the mask
      (amplitude: max |truth| when it is constant; phase: π when it is flat);
    - SSIM: scikit-image on the mask's bounding box, the SSIM map averaged over the mask;
    - FRC: on the complex images in the bounding box, apodised by ``soft_window``,
      threshold ``frc_threshold`` (1/7 by default).
    """
    t, r, m = alignment.truth, alignment.recon, alignment.mask
    amp_t, amp_r = np.abs(t), np.abs(r)
    phase_t = np.angle(t)
    phase_r = phase_t + np.angle(r * np.conj(t))
    amp_range = _data_range(amp_t[m], float(np.max(amp_t[m])))
    phase_range = _data_range(phase_t[m], math.pi)
    box = alignment.box
    freqs, frc, count = fourier_ring_correlation(t[box], r[box], soft_window(m[box]))
    res = frc_resolution(freqs, frc, frc_threshold)
    return {
        "n_pixels": int(m.sum()),
        "amplitude_rmse": float(np.sqrt(np.mean((amp_r[m] - amp_t[m]) ** 2))),
        "amplitude_psnr_db": _psnr_db(amp_t[m], amp_r[m], amp_range),
        "amplitude_ssim": _ssim(amp_t, amp_r, m, amp_range),
        "phase_rmse_rad": float(np.sqrt(np.mean((phase_r[m] - phase_t[m]) ** 2))),
        "phase_psnr_db": _psnr_db(phase_t[m], phase_r[m], phase_range),
        "phase_ssim": _ssim(phase_t, phase_r, m, phase_range),
        "amplitude_data_range": amp_range,
        "phase_data_range_rad": phase_range,
        "frc_threshold": float(frc_threshold),
        "frc_resolution_px": res["resolution_px"],
        "frc_reaches_nyquist": res["reaches_nyquist"],
        "frc_curve": {"frequency": freqs.tolist(), "frc": frc.tolist(), "pixels": count.tolist()},
    }
