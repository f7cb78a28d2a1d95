"""How well could any object fit these patterns? The Poisson noise floor of the amplitude misfit.

Refinement reports its misfit, the mean squared amplitude error per pixel
(``far_field_misfit``). Whether a value is good depends on the photon count:
at 10⁴ photons per frame a misfit that at 10⁶ would mean a wrong probe is
simply shot noise. The measured amplitude of a pixel with n counts is
sqrt(n)/s (s: the file's amplitude per square-root photon), and even the true
object leaves E[(sqrt(n) − sqrt(λ))²] = Var(sqrt(n)) + bias² per pixel, about
1/4 photon for bright pixels and about λ for dark ones. Summed over the
frames this is the misfit the truth itself would have, the floor.

A refined object far above the floor does not explain the data. On the
project's held-out scan the refined object ends at 0.93 of the floor, while
the same sweeps with a probe guess defocused by 6 rad held fixed stall at 48×
it (docs/fidelity.md): so ``scan_refinement`` records the ratio and warns
with the fix when it is large.

Both estimates read at most ``SAMPLE_FRAMES`` frames (evenly strided): the
floor is a mean per pixel, and a 10⁵-frame scan must not be copied in float64.

The floor is known only when the frames are whole photon counts in disguise
(``photon_quantum``); for background-subtracted or rescaled floats it is None
and nothing is claimed.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

SAMPLE_FRAMES = 128
"""Frames read (an even stride through the scan) for both estimates. 128 frames of 64² give the floor of 512 to
1.6 % on the four scans of docs/fidelity.md (0.4–0.7 % on three), in a quarter of the time (23 against 86 ms)."""
SAMPLE_VALUES = 200_000
"""Positive amplitudes looked at to find the photon quantum (a strided sample; ~10 ms)."""
WHOLE_FRACTION = 0.99
"""Fraction of sampled (amplitude·s)² that must lie within ``WHOLE_TOLERANCE`` of a whole number."""
WHOLE_TOLERANCE = 0.02
SMALL_COUNTS = 1000
MIN_SMALL = 100
_TABLE_MAX = 64  # above this many counts Var(sqrt(n)) + bias² is 1/4 to better than 0.5 %
_TABLE_STEPS = 8  # table points per photon of rate


def _sample_frames(amplitude: np.ndarray) -> np.ndarray:
    """At most ``SAMPLE_FRAMES`` frames of ``amplitude`` [..., N, N], evenly strided, as float64 [k, N, N]."""
    a = np.asarray(amplitude)
    a = a.reshape(-1, *a.shape[-2:])
    return a[:: max(1, -(-a.shape[0] // SAMPLE_FRAMES))].astype(np.float64)


def photon_quantum(amplitude: np.ndarray) -> Optional[float]:
    """s with amplitude = sqrt(counts)/s when the frames are whole counts in some amplitude unit, else None.

    The smallest positive amplitude is one photon's; the guess is accepted
    only if (amplitude·s)² is a whole number for almost every sampled pixel
    of up to ``SMALL_COUNTS`` counts (where float32 still resolves one count)
    and at least ``MIN_SMALL`` such pixels exist.
    """
    return _quantum(_sample_frames(amplitude))


def _quantum(frames: np.ndarray) -> Optional[float]:
    """``photon_quantum`` of already sampled float64 frames."""
    positive = frames[frames > 0]
    if positive.size == 0:
        return None
    s = 1.0 / float(positive.min())
    n = (positive[:: max(1, positive.size // SAMPLE_VALUES)] * s) ** 2
    n = n[n <= SMALL_COUNTS]
    if n.size < MIN_SMALL:
        return None
    return s if np.mean(np.abs(n - np.round(n)) <= WHOLE_TOLERANCE) >= WHOLE_FRACTION else None


def _expected_error_table() -> np.ndarray:
    """E[(sqrt(n) − sqrt(λ))²] for n ~ Poisson(λ), at λ = 0, 1/_TABLE_STEPS, … _TABLE_MAX (photon² units)."""
    from math import lgamma

    lam = np.arange(_TABLE_MAX * _TABLE_STEPS + 1, dtype=np.float64) / _TABLE_STEPS
    k = np.arange(4 * _TABLE_MAX + 64, dtype=np.float64)
    log_fact = np.array([lgamma(v + 1) for v in k])
    with np.errstate(divide="ignore", invalid="ignore"):  # λ = 0 is set just below
        p = np.exp(k[None, :] * np.log(lam[:, None]) - lam[:, None] - log_fact[None, :])
    p[0] = 0.0
    p[0, 0] = 1.0  # λ = 0: n = 0 surely
    return np.sum(p * (np.sqrt(k)[None, :] - np.sqrt(lam)[:, None]) ** 2, axis=1)


_TABLE = _expected_error_table()


def _local_rate(counts: np.ndarray) -> np.ndarray:
    """Each pixel's rate estimated as the mean count of its 3×3 neighbourhood in its frame (edges: replicated)."""
    padded = np.pad(counts, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = counts.shape[-2:]
    return sum(padded[:, r:r + h, c:c + w] for r in range(3) for c in range(3)) / 9.0


def poisson_floor(amplitude: np.ndarray) -> Optional[float]:
    """The misfit (mean squared amplitude error per pixel) the true object would leave, or None if unknowable.

    A pixel's rate is estimated from its 3×3 neighbourhood (one frame gives
    one count per pixel; the far field is smooth on that scale where it is
    dark, which is where the estimate matters: a bright pixel costs ≈ 1/4
    photon whatever its rate).
    """
    frames = _sample_frames(amplitude)
    s = _quantum(frames)
    if s is None:
        return None
    counts = np.rint((frames * s) ** 2)
    rate = _local_rate(counts)
    per_pixel = np.interp(rate, np.arange(_TABLE.size) / _TABLE_STEPS, _TABLE, right=0.25)
    return float(np.mean(per_pixel)) / s**2
