"""The reference backend: one batch of non-overlapping frames as a few numpy operations over [B, N, N].

Every other backend (torch, onnxruntime) computes the same update and is
tested against this one. The update per frame is ePIE's (Maiden & Rodenburg
2009) with rPIE's regularised step (Maiden, Johnson & Li 2017): with ψ = P·O
the exit wave, Ψ = F ψ its far field and Ψ' = A·Ψ/|Ψ| the far field given the
measured amplitude A,

    O ← O + conj(P)·F⁻¹(Ψ' − Ψ) / ((1 − α)|P|² + α·max|P|²)

(α = 1: ePIE with step 1). The probe update, when asked for, is the same
with the roles swapped, summed over the batch (which, for one frame, is ePIE's).
Sub-pixel positions read the object by bilinear interpolation of an
(N+1)² window and write the correction back with the same weights (the adjoint).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import numpy as np

from ..reconstruction.real_view import real_view
from ..reconstruction.stitching import bilinear_spread

try:  # scipy's pocketfft: 13.6 vs 17.5 µs per 64² frame, 1.08× on a whole refinement (docs/fidelity.md)
    from scipy import fft as FFT
except ImportError:  # a runtime without scipy computes the same transforms with numpy's
    FFT = np.fft

TINY = 1e-20  # |Ψ| below this has no phase to keep: no correction there (every backend does the same)


def window_view(obj: np.ndarray, N: int) -> np.ndarray:
    """A writeable [H−N, W−N, N+1, N+1] view of a canvas: [r, c] is the window with corner (r, c).

    Indexing it with a batch's corners copies whole window rows at once (several
    times faster than a flat fancy index per pixel); writing through it is safe
    when no two windows of a batch share a pixel.
    """
    H, W = obj.shape
    side = N + 1
    sr, sc = obj.strides
    return np.lib.stride_tricks.as_strided(obj, (H - side + 1, W - side + 1, side, side), (sr, sc, sr, sc))


def interpolate_windows(s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B, N, N] bilinear reads of windows ``s`` [B, N+1, N+1] with corner weights [B, 4] (``window_corners``).

    Separably and as lerps, rows then columns (the corner weights are products (1−fy|fy)·(1−fx|fx)); the
    real factors scale the differences through their real view (``real_view``).
    """
    w = weights[:, :, None, None]
    fy = w[:, 2] + w[:, 3]  # [B, 1, 1]
    fx = w[:, 1] + w[:, 3]
    rows = s[:, 1:] - s[:, :-1]
    r, _ = real_view(rows)
    r *= fy
    rows += s[:, :-1]
    o = rows[:, :, 1:] - rows[:, :, :-1]
    v, _ = real_view(o)
    v *= fx
    o += rows[:, :, :-1]
    return o


class NumpyBackend:
    """Holds the object canvas and probe as numpy arrays and updates them one batch at a time."""

    name = "numpy"
    device = "cpu"

    def __init__(self, obj: np.ndarray, probe: np.ndarray, *, alpha: float, probe_alpha: float,
                 refine_probe: bool, step: float = 1.0, threads: int = 1) -> None:
        self.obj = np.ascontiguousarray(obj, dtype=np.complex64)
        self.probe = np.ascontiguousarray(probe, dtype=np.complex64)
        self.alpha, self.probe_alpha, self.refine_probe = float(alpha), float(probe_alpha), bool(refine_probe)
        self.step = float(step)
        self.threads = max(1, int(threads))
        self._helpers: Optional[tuple[int, ThreadPoolExecutor]] = None  # (pid, pool): see _in_parts
        self.N = self.probe.shape[0]
        self._offsets = np.arange(self.N + 1)
        self._velocity: Optional[np.ndarray] = None
        self._before: Optional[np.ndarray] = None
        self._accumulated: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._object_factor: Optional[tuple[np.ndarray, np.ndarray]] = None

    # ---------------------------------------------------------------- the canvas
    def get_object(self) -> np.ndarray:
        return self.obj.copy()

    def set_object(self, obj: np.ndarray) -> None:
        self.obj = np.ascontiguousarray(obj, dtype=np.complex64)
        self._velocity = None

    def get_probe(self) -> np.ndarray:
        return self.probe.copy()

    def multiply_object(self, factor: np.ndarray) -> None:
        """O ← O·factor and the momentum with it (a phase correction moves the motion too; a reset costs sweeps)."""
        self.obj *= factor
        if self._velocity is not None:
            self._velocity *= factor

    # ---------------------------------------------------------------- one sweep
    def begin_momentum_step(self, momentum: float) -> None:
        self._before = self.obj.copy() if momentum else None

    def end_momentum_step(self, momentum: float) -> None:
        """Momentum after each part of a sweep (mPIE's idea; the engine sets the parts): v ← η·v + ΔO, O ← O + η·v."""
        if not momentum or self._before is None:
            return
        change = self.obj - self._before
        if self._velocity is None:
            self._velocity = change
        else:
            self._velocity *= np.float32(momentum)
            self._velocity += change
        self.obj += np.float32(momentum) * self._velocity
        self._before = None

    def _windows(self) -> np.ndarray:
        return window_view(self.obj, self.N)

    def _step(self, measured: np.ndarray, s: np.ndarray, weights: np.ndarray):
        """From the batch's windows ``s`` [B, N+1, N+1]: (patches O, F⁻¹(Ψ' − Ψ)/N², Σ misfit, weights).

        The correction comes back divided by N² (the caller's factors carry
        the N²: one pass fewer). Each step works in place on the batch's own
        temporaries: the batch is a few hundred kB, so the time goes into the
        number of passes over it, not into memory traffic (profiled).
        """
        w = weights[:, :, None, None]
        o = interpolate_windows(s, weights)
        N = self.N
        n2 = np.float32(N**2)
        # Ψ/N², the spectrum in norm="forward" units: numpy 2.4's unscaled complex64 transforms (fft2's default,
        # ifft2's norm="forward") run several times slower than the scaled ones (measured: 134 vs 17 µs per
        # 64² frame), so both transforms here are scaled ones and the N² is put back by the caller
        spectrum = FFT.fft2(self.probe * o, norm="forward")
        mag = np.abs(spectrum)
        scaled = measured * (1 / n2)
        diff = (mag - scaled).reshape(-1)
        misfit = float(np.dot(diff, diff)) * float(n2) ** 2
        # Ψ' − Ψ = Ψ·(A/|Ψ| − 1): the measured modulus, the model's phase; where Ψ = 0 (no phase), no change
        np.maximum(mag, np.float32(TINY) / n2, out=mag)
        np.divide(scaled, mag, out=mag)
        mag -= 1
        spectrum *= mag
        dpsi = FFT.ifft2(spectrum).astype(np.complex64, copy=False)  # F⁻¹(Ψ' − Ψ) / N²
        return o, dpsi, misfit, w

    def _spread(self, delta: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The adjoint of the bilinear read: an [B, N, N] correction spread onto [B, N+1, N+1] windows."""
        return bilinear_spread(delta, w[:, 2] + w[:, 3], w[:, 1] + w[:, 3])  # fy, fx: [B, 1, 1]

    def _probe_update(self, o: np.ndarray, dpsi: np.ndarray, scale: float) -> None:
        """The probe step from the batch's patches ``o`` and corrections ``dpsi`` (times ``scale``)."""
        self._probe_step(np.sum(np.conj(o) * dpsi, axis=0) * np.float32(scale), np.sum(np.abs(o) ** 2, axis=0))

    def _probe_step(self, num: np.ndarray, den: np.ndarray) -> None:
        """P ← P + num / ((1 − α)·den + α·max den), from a batch's sums num = Σ conj(o)·Δψ and den = Σ |o|²
        (every backend that sums them its own way makes the step here)."""
        a = self.probe_alpha
        self.probe = self.probe + (num / ((1 - a) * den + a * np.max(den))).astype(np.complex64)

    def gain(self) -> np.ndarray:
        """The object step's per-pixel factor: step·conj(P) / ((1 − α)|P|² + α·max|P|²)."""
        P = self.probe
        p2 = np.abs(P) ** 2
        return (self.step * np.conj(P) / ((1 - self.alpha) * p2 + self.alpha * np.max(p2))).astype(np.complex64)

    def _factor(self) -> np.ndarray:
        """gain()·N², which turns ``_step``'s correction into the object's; kept while the probe is."""
        probe, factor = self._object_factor or (None, None)
        if probe is not self.probe or factor is None:  # made again whenever the probe was replaced
            factor = self.gain() * np.float32(self.N**2)
            self._object_factor = (self.probe, factor)
        return factor

    def _part(self, windows: np.ndarray, factor: np.ndarray, measured: np.ndarray, rows: np.ndarray,
              cols: np.ndarray, weights: np.ndarray):
        s = windows[rows, cols]  # a copy of the batch's windows
        o, dpsi, misfit, w = self._step(measured, s, weights)
        s += self._spread(factor * dpsi, w)
        windows[rows, cols] = s  # no two windows of a batch share a pixel
        return o, dpsi, misfit

    def _in_parts(self, n: int, run: Callable[[slice], Any]) -> list[Any]:
        """``run`` on each of up to ``threads`` slices of a batch of ``n`` frames (two frames at least each), the
        first in the caller's thread and the others on helper threads; the results in the slices' order.

        The helpers are made again in a forked child, where the parent's
        threads do not exist (a child would otherwise wait on them forever).
        """
        parts = max(1, min(self.threads, n // 2))
        if parts == 1:
            return [run(slice(0, n))]
        if self._helpers is None or self._helpers[0] != os.getpid():
            self._helpers = (os.getpid(), ThreadPoolExecutor(self.threads - 1, thread_name_prefix="refine-part"))
        edges = np.linspace(0, n, parts + 1).round().astype(int)
        pieces = [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]
        futures = [self._helpers[1].submit(run, piece) for piece in pieces[1:]]
        return [run(pieces[0])] + [f.result() for f in futures]

    def run_batch(self, measured: np.ndarray, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray) -> float:
        """Update the object (and probe) from one batch of mutually non-overlapping frames; returns Σ misfit.

        With ``threads`` > 1 the batch is split between threads: its frames are
        independent, numpy's FFTs and array operations release the GIL, and the
        windows they write are disjoint.
        """
        windows, factor = self._windows(), self._factor()
        done = self._in_parts(len(rows), lambda i: self._part(windows, factor, measured[i], rows[i], cols[i],
                                                                weights[i]))
        if self.refine_probe:  # the step from the whole batch's patches and corrections
            o, dpsi = (np.concatenate(x) if len(x) > 1 else x[0] for x in zip(*(d[:2] for d in done), strict=True))
            self._probe_update(o, dpsi, self.N**2)
        return sum(d[2] for d in done)

    # ---------------------------------------------------------------- parallel (all frames, then one update)
    def accumulate_batch(self, measured: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                         weights: np.ndarray) -> float:
        """Add one batch's corrections to the sweep's sums without touching the object (``parallel`` batching)."""
        W = self.obj.shape[1]
        off = self._offsets
        idx = (rows[:, None, None] + off[None, :, None]) * W + cols[:, None, None] + off[None, None, :]
        o, dpsi, misfit, w = self._step(measured, self.obj.reshape(-1)[idx], weights)
        P = self.probe
        size = self.obj.size
        num = self._spread(np.conj(P) * np.float32(self.N**2) * dpsi, w)
        den = self._spread(np.broadcast_to(np.abs(P) ** 2, dpsi.shape).astype(np.float32), w)
        flat = idx.reshape(-1)
        n_re = np.bincount(flat, weights=num.real.reshape(-1), minlength=size)
        n_im = np.bincount(flat, weights=num.imag.reshape(-1), minlength=size)
        d = np.bincount(flat, weights=den.reshape(-1), minlength=size)
        if self._accumulated is None:
            self._accumulated = (n_re + 1j * n_im, d)
        else:
            self._accumulated = (self._accumulated[0] + n_re + 1j * n_im, self._accumulated[1] + d)
        if self.refine_probe:
            self._probe_update(o, dpsi, self.N**2 / len(rows))
        return misfit

    def apply_accumulated(self) -> None:
        """O ← O + Σ conj(P)Δψ / ((1−α)Σ|P|² + α·max Σ|P|²): a per-pixel step, as in LSQML's preconditioner."""
        if self._accumulated is None:
            return
        num, den = self._accumulated
        a = self.alpha
        step = num / ((1 - a) * den + a * np.max(den) + 1e-12)
        self.obj += step.reshape(self.obj.shape).astype(np.complex64)
        self._accumulated = None
