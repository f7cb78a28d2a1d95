"""A total-variation prior on the refined object's amplitude, at the strength its own noise sets.

Refinement fits the patterns to their Poisson noise floor (``noise_floor``):
on the project's held-out scan the refined object's misfit is 0.93 of what
the true object itself leaves. What remains wrong in its amplitude is shot
noise, spread over every pixel as a fine grain that no further sweep removes
(started from the truth, 30 sweeps end at amplitude SSIM 0.84 too). A
measured pattern pins the object's phase far better than its modulus, so the
grain is mostly in the amplitude; the phase is left alone.

The prior is the standard one of iterative ptychography engines: total
variation, here as Chambolle's (2004) projection algorithm for the
Rudin–Osher–Fatemi problem, min_u ‖u − f‖²/2 + w·TV(u), applied to |O| with
the phase kept. Its one parameter, the weight ``w``, is the noise's own
standard deviation, estimated from the amplitude image by the median absolute
diagonal (Haar HH) difference over the lit pixels (Donoho's estimator, as
``skimage.restoration.estimate_sigma`` computes it without PyWavelets). Where
the data are bright the estimate is small and the prior does little. The rule
``w = σ̂`` was chosen on the training scan (`train.npz`: 0.5σ̂ 0.948, σ̂ 0.951,
2σ̂ 0.921) and scored unchanged on the held-out and two independent
simulators' scans (docs/fidelity.md).

The solver is written here, not imported, because the runtime's dependencies
are numpy, h5py and onnx: scikit-image would bring scipy and more to every
beamline host. It follows ``skimage.restoration.denoise_tv_chambolle``'s
stopping rule, and a test checks that the two agree.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

PRIORS = ("tv", "none")
"""``RefineSettings.amplitude_prior``: "tv" (the default) or "none" (the data-only object)."""
TV_EPS = 2e-4
"""Stop when the energy changes by less than this fraction of its first value (scikit-image's default)."""
TV_MAX_ITERATIONS = 200
MIN_PIXELS = 64
"""Fewer lit pixels than this give no noise estimate, and the prior is skipped."""
SAMPLE_BLOCKS = 1 << 21
"""At most this many 2×2 blocks are read for the noise estimate (a strided sample of row pairs)."""
LIT_FRACTION = 0.2
"""Pixels whose stitch weight is at least this fraction of the largest are where the noise is estimated."""
_MAD_TO_SIGMA = 0.6745  # median |x| / σ for a normal x


def well_lit(weight: np.ndarray) -> np.ndarray:
    """Pixels whose stitch weight (Σ of the window over the frames) is ≥ ``LIT_FRACTION`` of the largest."""
    w = np.asarray(weight, dtype=np.float64)
    top = float(w.max()) if w.size else 0.0
    return w >= LIT_FRACTION * top if top > 0 else np.zeros(w.shape, dtype=bool)


def noise_sigma(image: np.ndarray, mask: np.ndarray) -> Optional[float]:
    """The standard deviation of white noise in ``image`` [H, W], from its pixels inside ``mask``.

    Each 2×2 block's diagonal difference (a − b − c + d)/2 cancels any plane
    and keeps σ of white noise; its median absolute value over blocks wholly
    inside ``mask``, divided by 0.6745, is robust to the object's edges.
    None when fewer than ``MIN_PIXELS`` blocks are inside. A large image is
    read on an even stride of row pairs, at most ``SAMPLE_BLOCKS`` blocks.
    """
    a = np.asarray(image, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    if a.ndim != 2 or a.shape != m.shape or min(a.shape) < 2:
        return None
    top = np.arange(0, a.shape[0] - 1, max(1, -(-(a.shape[0] - 1) * (a.shape[1] - 1) // SAMPLE_BLOCKS)))
    a0, a1, m0, m1 = a[top], a[top + 1], m[top], m[top + 1]
    inside = m0[:, :-1] & m1[:, :-1] & m0[:, 1:] & m1[:, 1:]
    if int(inside.sum()) < MIN_PIXELS:
        return None
    diagonal = 0.5 * (a0[:, :-1] - a1[:, :-1] - a0[:, 1:] + a1[:, 1:])
    return float(np.median(np.abs(diagonal[inside]))) / _MAD_TO_SIGMA


def tv_denoise(image: np.ndarray, weight: float, *, eps: float = TV_EPS,
               max_iterations: int = TV_MAX_ITERATIONS) -> tuple[np.ndarray, int]:
    """argmin_u ‖u − f‖²/2 + ``weight``·TV(u) for a real 2-D ``image`` f; returns (u, iterations run).

    Chambolle's dual iteration: u = f + div p, and each step moves the dual
    field p along ∇u by τ = 1/4, shrunk so that |p| ≤ ``weight`` (isotropic
    TV, forward differences, zero flux across the border). It computes in
    the image's precision (float32 or float64; other types as float64) and
    in place: eight image-sized arrays in all, 32 bytes per pixel in float32.
    """
    f = np.asarray(image)
    f = f if f.dtype in (np.float32, np.float64) else f.astype(np.float64)
    if weight <= 0:
        return f.copy(), 0
    tau = 0.25
    py, px, gy, gx = (np.zeros_like(f) for _ in range(4))
    u = np.empty_like(f)  # f + div p
    magnitude, scratch = np.empty_like(f), np.empty_like(f)
    first = previous = None
    run = 0
    while run < max_iterations:
        run += 1
        np.add(py, px, out=u)
        np.negative(u, out=u)  # −(py + px) + the shifted terms: div p, zero on the first step
        u[1:, :] += py[:-1, :]
        u[:, 1:] += px[:, :-1]
        energy_div = float(np.dot(u.ravel(), u.ravel()))
        u += f
        np.subtract(u[1:, :], u[:-1, :], out=gy[:-1, :])  # the last row and column of the gradients stay 0
        np.subtract(u[:, 1:], u[:, :-1], out=gx[:, :-1])
        np.multiply(gy, gy, out=magnitude)
        np.multiply(gx, gx, out=scratch)
        magnitude += scratch
        np.sqrt(magnitude, out=magnitude)
        energy = (energy_div + weight * float(np.sum(magnitude, dtype=np.float64))) / f.size
        magnitude *= tau / weight
        magnitude += 1.0
        for p, g in ((py, gy), (px, gx)):  # p ← (p − τ·g) / (1 + τ|g|/w); g is recomputed next step
            g *= tau
            p -= g
            p /= magnitude
        if first is None:
            first = previous = energy
        elif abs(previous - energy) < eps * first:
            break
        else:
            previous = energy
    return u, run


def apply_amplitude_prior(obj: np.ndarray, lit: np.ndarray, region: np.ndarray, rule: str
                          ) -> tuple[np.ndarray, dict[str, Any]]:
    """The refined ``obj`` [H, W] with the prior ``rule`` on its amplitude, and the record of what was done.

    The noise is estimated on the ``lit`` pixels (those the scan measured
    well); the denoised amplitude replaces the object's inside ``region``
    only (the refined pixels), so fill around the scan is kept as it is.
    """
    if rule not in PRIORS:
        raise ValueError(f"amplitude prior must be one of {', '.join(PRIORS)} (got {rule!r})")
    if rule == "none":
        return obj, {"rule": "none"}
    region = np.asarray(region, dtype=bool)
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return obj, {"rule": rule, "applied": False, "why_not": "no refined pixel to apply it to"}
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # the solve's memory is the region's box
    inside, part = region[box], obj[box]
    amplitude = np.abs(part).astype(np.float32)
    sigma = noise_sigma(amplitude, np.asarray(lit, dtype=bool)[box] & inside)
    if not sigma:
        return obj, {"rule": rule, "applied": False,
                     "why_not": f"fewer than {MIN_PIXELS} well-lit pixels, or no noise, to set its weight from"}
    smooth, iterations = tv_denoise(amplitude, sigma)
    out = np.array(obj, dtype=np.complex64)
    phase = np.exp(1j * np.angle(part))
    out[box] = np.where(inside, np.maximum(smooth, 0.0) * phase, part)
    return out, {"rule": rule, "applied": True, "weight": sigma, "iterations": iterations,
                 "on": "amplitude (phase kept)", "method": "total variation (Chambolle 2004), weight = noise sigma"}
