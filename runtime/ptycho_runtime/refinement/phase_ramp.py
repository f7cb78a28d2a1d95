"""The object's global phase ramp, fitted to the frames directly: the one mode the sweeps move slowest.

Multiplying the object by a linear phase exp(i(k_r·row + k_c·col)) shifts
every frame's far field by the same fraction of a pixel (k·N/2π). With a
probe whose far field is smooth (a KB-like flat top) the data pin that shift
down only weakly, so ePIE-type sweeps, which correct each frame locally,
take hundreds of sweeps to remove a ramp that a start (flat, or a network
trained on another probe) got wrong. On pty-chi's scan the refined object
fitted the frames to 1.12× their noise floor and still carried 0.8 rad of
ramp across the field: phase SSIM 0.72, 0.89 with the ramp removed
(docs/fidelity.md).

The ramp is two numbers, so it is fitted as two numbers: the misfit of the
object times a trial ramp (``far_field_misfit``'s), on a sample of the
frames, at six trial ramps around none; a Newton step on that quadratic
model; kept only when it lowers the sampled misfit. With the probe refined,
a ramp is shared between object and probe (blind ptychography's ambiguity)
and the probe absorbs it, so the fit is for a fixed probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .epie import bilinear_read
from .numpy_backend import FFT

DEFAULT_EVERY = 10
"""Sweeps between two fits (measured with 3, 5 and 10 on three scans: 10 is as good and cheapest)."""
SAMPLE = 256
"""Frames the misfit is summed over (every k-th of the scan): enough for two parameters."""
STEP = 1e-3
"""The finite-difference step in rad/px (0.3 rad across a 300 px field: well inside the quadratic region)."""
MAX_SHIFT_PX = 0.25
"""The largest far-field shift one fit may take (|k|·N/2π): beyond it the quadratic model is not to be trusted, so a
longer Newton step is shortened to it (the next fit goes on from there). Measured fits are 0.01–0.05 px."""


@dataclass(frozen=True)
class RampFit:
    """A fitted ramp: ``rad_per_px`` (rows, cols), and the sampled misfit before and with it (``applied``)."""

    rad_per_px: tuple[float, float]
    misfit_before: float
    misfit_after: float

    @property
    def applied(self) -> bool:
        return self.misfit_after < self.misfit_before

    def record(self, after_sweep: int) -> dict[str, object]:
        return {"after_sweep": int(after_sweep), "rad_per_px": [float(k) for k in self.rad_per_px],
                "misfit_ratio": self.misfit_after / self.misfit_before if self.misfit_before > 0 else None,
                "applied": self.applied}


def ramp_factor(shape: tuple[int, int], rad_per_px: tuple[float, float]) -> np.ndarray:
    """exp(i(k_r·row + k_c·col)) over a canvas, centred on it (so the ramp adds no global phase at the centre)."""
    rows = np.arange(shape[0], dtype=np.float64) - (shape[0] - 1) / 2
    cols = np.arange(shape[1], dtype=np.float64) - (shape[1] - 1) / 2
    along_rows = np.exp(1j * rad_per_px[0] * rows).astype(np.complex64)
    along_cols = np.exp(1j * rad_per_px[1] * cols).astype(np.complex64)
    return along_rows[:, None] * along_cols[None, :]  # separable: one product per pixel, no exp


def fit_phase_ramp(obj: np.ndarray, amplitude: np.ndarray, probe: np.ndarray, starts: np.ndarray,
                   sample: int = SAMPLE, step: float = STEP) -> RampFit:
    """The ramp that, multiplied onto ``obj``, best fits the frames (``far_field_misfit``'s conventions and value).

    ``amplitude`` [n, N, N] in the probe's units (DC at N/2), ``starts``
    [n, 2] (column, row) of each frame's corner on ``obj``'s canvas. Returns
    ``RampFit`` with (0, 0) and equal misfits when the sampled misfit is not
    convex in the ramp there (no step is then taken).

    The sampled exit waves P·o_j are read once: under a frame, the object's
    ramp is the same ramp over the patch times a constant phase (which no
    pattern sees), so each trial ramp is one [n, N, N] product and one
    batched FFT, not a read of the whole canvas.
    """
    every = max(1, amplitude.shape[0] // max(1, int(sample)))
    amp, at = amplitude[::every], starts[::every]
    N = amp.shape[-1]
    waves = np.asarray(probe, np.complex64) * np.stack([bilinear_read(obj, s, N) for s in at]).astype(np.complex64)
    measured = np.fft.ifftshift(np.asarray(amp, np.float32), axes=(-2, -1))  # DC at pixel 0, where fft2 puts it
    local = np.arange(N, dtype=np.float64) - (N - 1) / 2

    def misfit(k: tuple[float, float]) -> float:
        ramp = np.exp(1j * (k[0] * local[:, None] + k[1] * local[None, :])).astype(np.complex64)
        model = np.abs(FFT.fft2(waves * ramp, norm="forward"))  # |F ψ| / N², so ×N is |F ψ| / N
        model *= np.float32(N)
        model -= measured
        return float(np.mean(np.square(model, dtype=np.float64)))

    h = float(step)
    f0 = misfit((0.0, 0.0))
    fr, fr_ = misfit((h, 0.0)), misfit((-h, 0.0))
    fc, fc_ = misfit((0.0, h)), misfit((0.0, -h))
    frc = misfit((h, h))
    gradient = np.array([fr - fr_, fc - fc_]) / (2 * h)
    hrc = (frc - fr - fc + f0) / h**2
    hessian = np.array([[(fr - 2 * f0 + fr_) / h**2, hrc], [hrc, (fc - 2 * f0 + fc_) / h**2]])
    if not np.all(np.isfinite(hessian)) or np.any(np.linalg.eigvalsh(hessian) <= 0):
        return RampFit((0.0, 0.0), f0, f0)
    k = -np.linalg.solve(hessian, gradient)
    longest = 2 * np.pi * MAX_SHIFT_PX / N
    if np.hypot(*k) > longest:  # a nearly flat direction can ask for a step far outside the model
        k *= longest / np.hypot(*k)
    ramp = (float(k[0]), float(k[1]))
    return RampFit(ramp, f0, misfit(ramp))
