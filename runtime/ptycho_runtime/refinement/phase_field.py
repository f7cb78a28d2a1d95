"""The object's slowly varying phase, measured frame by frame and solved over the whole scan in one step.

What the sweeps leave longest is a phase error that varies slowly across
the object: the constant phase of regions larger than the probe, which no
single pattern sees and the overlap passes on only one neighbour per sweep.
After 12 sweeps from the network's start on the project's held-out scan,
removing a 16 px-smooth part of the phase error (the truth's, an oracle)
lifts phase SSIM from 0.80 to 0.97 (docs/fidelity.md).

Each frame does see the *gradient* of such an error: under a frame it is a
constant (invisible) plus a ramp, and a ramp shifts the frame's far field.
So a fit here:

1. measures every frame's local ramp at once: the misfit's gradient g_j
   and Gauss-Newton curvature H_j in the frame's two ramp numbers, from
   the far field of its exit wave and of the wave times each coordinate
   (three batched FFTs);
2. models the correction as a smooth field φ, bilinear between nodes
   ``spacing`` px apart, whose ramp under frame j is the |P|²-weighted plane
   slope of φ over the frame, M_j·c, linear in the nodes' values c;
3. solves the quadratic model Σ_j g_j·M_j c + ½ (M_j c)ᵀ H_j (M_j c) plus a
   curvature penalty on φ (second differences between nodes, so a plane is
   free: the global ramp is part of this fit) by conjugate gradients;
4. keeps exp(iφ) only when it lowers the frames' misfit.

The penalty matters: a field free to bend within one frame fits every
frame's ramp and adds curvature the model does not see (on the project's
scan, an 8 px grid without it raised the misfit by 8% where it predicted
−2.5%). With the probe refined a ramp is shared between object and probe
and the probe takes it up, so a fit then leaves the field's plane out
(``planes=False``): the rest of a smooth field no single probe can mimic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from ..reconstruction.compiled import available_kernels, default_threads
from ..reconstruction.overlap_solve import conjugate_gradients
from .batching import fractions, window_corners
from .exit_waves import CHUNK, exit_waves, wave_misfits
from .numpy_backend import FFT

DEFAULT_EVERY = 4
"""Sweeps between two fits."""
SPACING = 16
"""Pixels between the field's nodes (a quarter of a 64² frame)."""
SMOOTHNESS = 0.1
"""The curvature penalty's weight, relative to the data's mean curvature per node."""
MIN_FRAMES_PER_NODE = 0.75
"""Frames are thinned (every k-th) to this many per node the frames reach, at least: the field has far fewer
unknowns than the frames have ramps. Measured on three 1,000-frame scans: every 2nd or 3rd frame (this rule: 2 on
the project's scan, 3 on pty-chi's and ptychodus's) gives the same phase SSIM as all of them to ±0.003; every 4th
(0.5 per node) cost pty-chi's scan 0.012."""
CHECK_EVERY = 4
"""Every k-th frame is re-measured to check that a fit lowers the misfit (a quarter of the frames: ~20 ms)."""
CG_TOLERANCE = 1e-3
"""Relative residual of the solve: the field is a correction re-fitted a few sweeps later (1e-6 took 371 CG steps)."""


@dataclass(frozen=True)
class PhaseFieldFit:
    """One fit: the misfit before and with the field (every ``CHECK_EVERY``-th frame), its peak-to-peak phase and
    the frames used."""

    misfit_before: float
    misfit_after: float
    peak_to_peak_rad: float
    frames_used: int

    @property
    def applied(self) -> bool:
        return self.misfit_after < self.misfit_before

    def record(self, after_sweep: int) -> dict[str, object]:
        return {"after_sweep": int(after_sweep), "peak_to_peak_rad": self.peak_to_peak_rad,
                "misfit_ratio": self.misfit_after / self.misfit_before if self.misfit_before > 0 else None,
                "frames_used": self.frames_used, "applied": self.applied}


def _second_difference(c: np.ndarray, axis: int) -> np.ndarray:
    return np.diff(c, 2, axis=axis)


def _second_difference_adjoint(d: np.ndarray, axis: int, length: int) -> np.ndarray:
    shape = list(d.shape)
    shape[axis] = length
    out = np.zeros(shape)
    head, mid, tail = (tuple(slice(a, a + d.shape[axis]) if k == axis else slice(None) for k in range(d.ndim))
                       for a in (0, 1, 2))
    out[head] += d
    out[mid] -= 2 * d
    out[tail] += d
    return out


def _interpolation(n_px: int, n_nodes: int, spacing: int, first: int = 0) -> np.ndarray:
    """[n_px, n_nodes]: pixel first + p read bilinearly from nodes ``spacing`` px apart (node 0 at pixel 0)."""
    p = first + np.arange(n_px)
    i, f = p // spacing, (p % spacing) / spacing
    B = np.zeros((n_px, n_nodes))
    B[np.arange(n_px), i] += 1 - f
    B[np.arange(n_px), np.minimum(i + 1, n_nodes - 1)] += f
    return B


class PhaseField:
    """The fit's fixed part for one scan: nodes, and each frame's slope operator M_j (positions and probe's window).

    ``shape`` is the object canvas; ``starts`` [n, 2] the (column, row)
    canvas coordinates of each frame's pixel (0, 0); ``probe`` [N, N] gives
    the |P|² weights of the slopes (the window the far field sees).
    """

    def __init__(self, shape: tuple[int, int], probe: np.ndarray, starts: np.ndarray, spacing: int = SPACING,
                 smoothness: float = SMOOTHNESS) -> None:
        N = int(probe.shape[-1])
        self.N, self.spacing, self.smoothness = N, int(spacing), float(smoothness)
        self.shape = (int(shape[0]), int(shape[1]))
        all_starts = np.asarray(starts, dtype=np.float64).reshape(-1, 2)
        s = self.spacing
        self.nodes = ((self.shape[0] - 1) // s + 2, (self.shape[1] - 1) // s + 2)
        w = np.abs(np.asarray(probe, dtype=np.complex128)) ** 2
        w /= w.sum()
        r, c = np.indices((N, N), dtype=np.float64)
        dr, dc = r - (w * r).sum(), c - (w * c).sum()
        spread = [max(float((w * d**2).sum()), 1e-12) for d in (dr, dc)]  # a one-pixel probe has none
        slopes = np.stack([w * dr / spread[0], w * dc / spread[1]])  # plane slope = Σ D·φ
        m = N // s + 2  # nodes a frame's pixels reach along one axis, whatever its offset from the grid
        local = np.stack([_interpolation(N, m, s, first=rho) for rho in range(s)])  # [s, N, m]
        kernels = np.einsum("xaiq,yqk->xyaik", np.einsum("xpi,apq->xaiq", local, slopes), local)  # [s, s, 2, m, m]
        row0 = np.floor(all_starts[:, 1]).astype(np.int64)
        col0 = np.floor(all_starts[:, 0]).astype(np.int64)
        node_rows = row0[:, None] // s + np.arange(m)
        node_cols = col0[:, None] // s + np.arange(m)
        index = (node_rows[:, :, None] * self.nodes[1] + node_cols[:, None, :])  # [n, m, m]
        values = kernels[row0 % s, col0 % s]  # [n, 2, m, m]
        reached = np.unique(index[np.abs(values).sum(axis=1) > 0]).size
        stride = max(1, int(len(all_starts) / max(1, reached) / MIN_FRAMES_PER_NODE))
        self.frames = np.arange(0, len(all_starts), stride)
        """The frames a fit uses (indices into ``starts``): every ``stride``-th."""
        self.starts = all_starts[self.frames]
        self._corners = window_corners(self.starts)
        self._values, self._index = values[self.frames], index[self.frames]
        self._penalty_diagonal = (_curvature_diagonal(self.nodes[0])[:, None]
                                  + _curvature_diagonal(self.nodes[1])[None, :]).reshape(-1)

    # ------------------------------------------------------------------ the linear model
    def slopes(self, c: np.ndarray) -> np.ndarray:
        """M c: each frame's ramp [n, 2] (rad/px, rows then columns) under the field with node values ``c``."""
        return np.einsum("jaik,jik->ja", self._values, c[self._index])

    def slopes_adjoint(self, v: np.ndarray) -> np.ndarray:
        """Mᵀ v for per-frame ramps ``v`` [n, 2]: node values."""
        weights = np.einsum("ja,jaik->jik", v, self._values)
        return np.bincount(self._index.reshape(-1), weights=weights.reshape(-1),
                           minlength=self.nodes[0] * self.nodes[1])

    def _penalty(self, c: np.ndarray) -> np.ndarray:
        grid = c.reshape(self.nodes)
        out = _second_difference_adjoint(_second_difference(grid, 0), 0, self.nodes[0])
        out += _second_difference_adjoint(_second_difference(grid, 1), 1, self.nodes[1])
        return out.reshape(-1)

    def solve(self, gradient: np.ndarray, curvature: np.ndarray, planes: bool = True) -> np.ndarray:
        """Node values c minimising Σ_j g_j·M_j c + ½ (M_j c)ᵀ H_j (M_j c) + the curvature penalty.

        ``planes=False`` removes the solution's plane (fitted over the nodes the
        frames reach, weighted by their data): what a probe being refined
        shares with the object, and takes up itself.
        """
        data_diagonal = np.bincount(self._index.reshape(-1), minlength=self.nodes[0] * self.nodes[1],
                                    weights=np.einsum("jaik,jab,jbik->jik", self._values, curvature,
                                                      self._values).reshape(-1))
        scale = float(data_diagonal[data_diagonal > 0].mean()) if np.any(data_diagonal > 0) else 1.0
        weight, ridge = self.smoothness * scale, 1e-6 * scale

        def normal(c: np.ndarray) -> np.ndarray:
            return (self.slopes_adjoint(np.einsum("jab,jb->ja", curvature, self.slopes(c)))
                    + weight * self._penalty(c) + ridge * c)

        diagonal = data_diagonal + weight * self._penalty_diagonal + ridge
        c = conjugate_gradients(normal, -self.slopes_adjoint(gradient), lambda r: r / diagonal, tol=CG_TOLERANCE,
                                maxiter=500)
        if not planes:
            rows, cols = (a.reshape(-1).astype(np.float64) for a in np.indices(self.nodes))
            basis = np.stack([np.ones_like(rows), rows, cols], axis=1)
            w = np.sqrt(data_diagonal)
            coef = np.linalg.lstsq(basis * w[:, None], c * w, rcond=None)[0]
            c = c - basis @ coef
        return c - c.mean()

    def field(self, c: np.ndarray) -> np.ndarray:
        """φ on the canvas [H, W] from node values ``c`` (bilinear between nodes)."""
        rows = _interpolation(self.shape[0], self.nodes[0], self.spacing)
        cols = _interpolation(self.shape[1], self.nodes[1], self.spacing)
        return rows @ c.reshape(self.nodes) @ cols.T

    # ------------------------------------------------------------------ the data
    def local_ramps(self, obj: np.ndarray, amplitude: np.ndarray, probe: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each frame's misfit gradient [n, 2], Gauss-Newton curvature [n, 2, 2] and misfit [n] in its own ramp.

        The misfit is Σ(|Ψ| − A)² with Ψ = F(P·o_j·e^{ik·u})/N (``far_field_misfit``'s
        units), u centred on the frame, for the fit's frames: ``amplitude``
        holds theirs (``amplitude[frames]`` of the scan's). With Φ_a = ∂Ψ/∂k_a = F(i·u_a·ψ)/N and
        J_a = Re(conj(Ψ)·Φ_a)/|Ψ|: g_a = 2Σ(|Ψ| − A)·J_a, H_ab = 2Σ J_a·J_b,
        three batched FFTs per chunk of frames.
        """
        n, N = amplitude.shape[0], self.N
        g, H, f = np.empty((n, 2)), np.empty((n, 2, 2)), np.empty(n)
        u = np.arange(N, dtype=np.float32) - np.float32((N - 1) / 2)
        k = available_kernels()
        if k is not None and k.ramp_step is not None:  # all of it compiled, the chunk split between threads
            rows, cols, weights = self._corners
            fy, fx = fractions(weights)
            canvas = np.ascontiguousarray(obj, dtype=np.complex64).view(np.float32)
            P = np.ascontiguousarray(probe, dtype=np.complex64).view(np.float32)
            for lo in range(0, n, CHUNK):
                part = slice(lo, min(n, lo + CHUNK))
                measured = np.ascontiguousarray(np.fft.ifftshift(np.asarray(amplitude[part], np.float32),
                                                                 axes=(-2, -1)))
                k.ramp_step(canvas, P, rows[part], cols[part], fy[part], fx[part], measured, u,
                            min(default_threads(), part.stop - lo), g[part], H[part], f[part])
            return g, H, f
        for lo in range(0, n, CHUNK):
            part = slice(lo, min(n, lo + CHUNK))
            waves = self._waves(obj, probe, part)
            spectrum = FFT.fft2(waves, norm="forward")
            # Φ_a = F(i·u_a·ψ)/N, so Re(conj(Ψ)·Φ_a) = −Im(conj(Ψ)·F(u_a·ψ))·N/N² and the Ns cancel in J
            derivatives = [FFT.fft2(waves * weights, norm="forward") for weights in (u[:, None], u[None, :])]
            measured = np.fft.ifftshift(np.asarray(amplitude[part], np.float32), axes=(-2, -1))
            if k is not None:  # the same sums in one compiled pass (``reconstruction.compiled``)
                k.ramp_sums(*(np.ascontiguousarray(a).view(np.float32) for a in (spectrum, *derivatives)),
                            np.ascontiguousarray(measured), np.float32(N), g[part], H[part], f[part])
                continue
            mag = np.abs(spectrum)
            residual = mag * np.float32(N)
            residual -= measured
            np.maximum(mag, np.float32(1e-30), out=mag)
            J = [(spectrum.imag * d.real - spectrum.real * d.imag) / mag * np.float32(N) for d in derivatives]
            f[part] = np.einsum("jpq,jpq->j", residual, residual, dtype=np.float64)
            for i in range(2):
                g[part, i] = 2 * np.einsum("jpq,jpq->j", residual, J[i])
                for m in range(i, 2):
                    H[part, i, m] = H[part, m, i] = 2 * np.einsum("jpq,jpq->j", J[i], J[m])
        return g, H, f

    def _waves(self, obj: np.ndarray, probe: np.ndarray, part: Union[slice, np.ndarray]) -> np.ndarray:
        """P·o_j for the frames in ``part``, read bilinearly from the canvas (the sweeps' read)."""
        rows, cols, weights = self._corners
        return exit_waves(obj, probe, rows[part], cols[part], weights[part])

    def misfit(self, obj: np.ndarray, amplitude: np.ndarray, probe: np.ndarray, every: int = 1) -> float:
        """Σ of the misfit over every ``every``-th of the fit's frames (``amplitude`` holds theirs; chunked)."""
        chosen = np.arange(0, amplitude.shape[0], max(1, int(every)))
        return float(sum(wave_misfits(self._waves(obj, probe, chosen[lo:lo + CHUNK]),
                                       amplitude[chosen[lo:lo + CHUNK]]).sum() for lo in range(0, len(chosen), CHUNK)))

    def fit(self, obj: np.ndarray, amplitude: np.ndarray, probe: np.ndarray, planes: bool = True
            ) -> tuple[Optional[np.ndarray], PhaseFieldFit]:
        """The factor exp(iφ) [H, W] (complex64) that lowers the frames' misfit, or None, and the fit's record.

        ``amplitude`` [len(frames), N, N] in ``probe``'s units, DC at N/2: the
        measured amplitudes of the fit's frames, ``amplitude_all[field.frames]``
        (selected once by the caller, not at every fit). ``planes=False`` while
        the probe is refined (``solve``).
        """
        if amplitude.shape[0] != len(self.frames):
            raise ValueError(f"amplitude holds {amplitude.shape[0]} frames, the fit uses {len(self.frames)}: pass "
                             "the measured amplitudes of the fit's frames, amplitude[field.frames]")
        g, H, f0 = self.local_ramps(obj, amplitude, probe)
        usable = np.linalg.eigvalsh(H)[:, 0] > 0  # a frame whose misfit is not convex in its ramp says nothing
        g, H = np.where(usable[:, None], g, 0.0), np.where(usable[:, None, None], H, 0.0)
        before = float(f0[::CHECK_EVERY].sum())
        if not usable.any():
            return None, PhaseFieldFit(before, before, 0.0, 0)
        phi = self.field(self.solve(g, H, planes))
        factor = np.exp(1j * phi).astype(np.complex64)
        after = self.misfit(obj * factor, amplitude, probe, every=CHECK_EVERY)
        fit = PhaseFieldFit(before, after, float(np.ptp(phi)), int(usable.sum()))
        return (factor if fit.applied else None), fit


def _curvature_diagonal(length: int) -> np.ndarray:
    """diag(D₂ᵀD₂) for second differences along ``length`` nodes: 1, 5, 6, …, 6, 5, 1 (fewer at short lengths)."""
    d = np.zeros(length)
    for k in range(length - 2):
        d[k:k + 3] += np.array([1.0, 4.0, 1.0])
    return d
