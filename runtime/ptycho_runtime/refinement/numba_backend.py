"""The numpy backend's batch update with its element-wise passes compiled by numba: the same numbers, faster.

Why: after its two FFTs, a numpy batch step is some twenty passes over the
batch's [B, N, N] arrays (the bilinear read, the probe multiply, the modulus
projection, the gain, the bilinear spread, the windows' copies), each a
separate ufunc call; on a 1,000-frame sweep at N = 64 they took ≈ 51 of its
≈ 78 ms (profiled). Here three compiled loops do them in one pass each,
reading and writing the canvas in place, and the FFTs stay scipy's (or
numpy's): ≈ 45 ms per sweep (docs/fidelity.md, "Compiled passes").

The update is the numpy backend's (``numpy_backend``'s docstring), term for
term and in the same order of operations, so the two agree to float32
rounding (a test holds them within 1e-4 after 20 sweeps). Everything else
(momentum, the probe step, the parallel batching) is inherited.

numba is optional (``pip install ptycho-runtime[fast]``): ``backend="auto"``
takes this backend on the CPU where numba is importable, else numpy. The
kernels are compiled on first use and cached on disk by numba (a few seconds
once per machine; loading them and numba itself ≈ 0.5 s per process after
that: ``load_kernels`` does it ahead, where a host wants it out of its first
reconstruction).
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np

from .numpy_backend import FFT, TINY, NumpyBackend

_KERNELS: Optional[SimpleNamespace] = None
_IN_PLACE: dict[str, Any] = {} if FFT is np.fft else {"overwrite_x": True}  # scipy's FFT may reuse its input


def numba_available() -> bool:
    """Whether numba can be imported here (without importing it: ``backend="auto"`` asks this on every refinement)."""
    return importlib.util.find_spec("numba") is not None


def _compile(cache: bool) -> SimpleNamespace:
    """The four kernels, as numba dispatchers (compiled at their first call, from numba's cache when it has them).

    Every array is float32 (complex64 arrays as their interleaved (re, im)
    view), C-contiguous. ``error_model="numpy"`` lets divisions vectorise (numba
    otherwise checks each for zero, which keeps the loops scalar: 3-5× slower,
    measured); the fast-math flags allowed are reciprocal and re-association
    (the misfit's sum), not finite-math: the data are checked finite on entry.
    """
    import numba

    jit = numba.njit(cache=cache, nogil=True, error_model="numpy", fastmath={"arcp", "contract", "reassoc", "nsz"})

    @jit
    def read_waves(canvas, probe, rows, cols, fy, fx, waves, patches, keep):  # pragma: no cover - compiled
        """waves[b] = P·o_b, o_b read bilinearly from the canvas (rows first, then columns, as
        ``interpolate_windows``); ``patches[b] = o_b`` when ``keep`` (the probe step needs them)."""
        n = probe.shape[0]
        m = 2 * n
        t = np.empty(m + 2, np.float32)
        u = np.empty(m, np.float32)
        for b in range(rows.shape[0]):
            r0, c0, y, x = rows[b], 2 * cols[b], fy[b], fx[b]
            for i in range(n):
                top = canvas[r0 + i, c0:c0 + m + 2]
                bottom = canvas[r0 + i + 1, c0:c0 + m + 2]
                for k in range(m + 2):
                    t[k] = top[k] + (bottom[k] - top[k]) * y
                for k in range(m):
                    u[k] = t[k] + (t[k + 2] - t[k]) * x
                p, w = probe[i], waves[b, i]
                for j in range(n):
                    w[2 * j] = p[2 * j] * u[2 * j] - p[2 * j + 1] * u[2 * j + 1]
                    w[2 * j + 1] = p[2 * j] * u[2 * j + 1] + p[2 * j + 1] * u[2 * j]
                if keep:
                    patches[b, i, :] = u

    @jit
    def project(spectrum, measured, inv_n2, tiny):  # pragma: no cover - compiled
        """Ψ ← Ψ·(A/|Ψ| − 1) in place on the flat spectrum (norm="forward" units); returns Σ(|Ψ| − A)²."""
        total = np.float32(0.0)
        for k in range(measured.shape[0]):
            re, im = spectrum[2 * k], spectrum[2 * k + 1]
            mag = np.sqrt(re * re + im * im)
            a = measured[k] * inv_n2
            d = mag - a
            total += d * d
            f = a / max(mag, tiny) - np.float32(1.0)
            spectrum[2 * k] = re * f
            spectrum[2 * k + 1] = im * f
        return total

    @jit
    def correct(factor, dpsi):  # pragma: no cover - compiled
        """dpsi[b] ← factor·dpsi[b] in place: the object's correction from F⁻¹(Ψ' − Ψ)."""
        for b in range(dpsi.shape[0]):
            for i in range(dpsi.shape[1]):
                f, d = factor[i], dpsi[b, i]
                for j in range(dpsi.shape[2] // 2):
                    fr, fi, dr, di = f[2 * j], f[2 * j + 1], d[2 * j], d[2 * j + 1]
                    d[2 * j] = fr * dr - fi * di
                    d[2 * j + 1] = fr * di + fi * dr

    @jit
    def spread(canvas, delta, rows, cols, fy, fx):  # pragma: no cover - compiled
        """canvas += the bilinear spread of each delta[b] onto its (N+1)² window (``bilinear_spread``'s order:
        rows, then columns). The batch's windows share no pixel; they are added one after the other anyway."""
        n, m = delta.shape[1], delta.shape[2]
        r = np.zeros(m, np.float32)
        for b in range(delta.shape[0]):
            r0, c0, y, x = rows[b], 2 * cols[b], fy[b], fx[b]
            y1, x1 = np.float32(1.0) - y, np.float32(1.0) - x
            for i in range(n + 1):
                if i == 0:
                    for k in range(m):
                        r[k] = delta[b, 0, k] * y1
                elif i == n:
                    for k in range(m):
                        r[k] = delta[b, n - 1, k] * y
                else:
                    here, above = delta[b, i], delta[b, i - 1]
                    for k in range(m):
                        r[k] = here[k] * y1 + above[k] * y
                row = canvas[r0 + i, c0:c0 + m + 2]
                row[0] += r[0] * x1
                row[1] += r[1] * x1
                for k in range(2, m):
                    row[k] += r[k] * x1 + r[k - 2] * x
                row[m] += r[m - 2] * x
                row[m + 1] += r[m - 1] * x

    @jit
    def probe_sums(patches, dpsi, num, den):  # pragma: no cover - compiled
        """num = Σ_b conj(o_b)·dpsi_b, den = Σ_b |o_b|² over the batch (the probe step's sums)."""
        num[:] = 0
        den[:] = 0
        for b in range(patches.shape[0]):
            for i in range(patches.shape[1]):
                o, d, s, q = patches[b, i], dpsi[b, i], num[i], den[i]
                for j in range(den.shape[1]):
                    orr, oi, dr, di = o[2 * j], o[2 * j + 1], d[2 * j], d[2 * j + 1]
                    s[2 * j] += orr * dr + oi * di
                    s[2 * j + 1] += orr * di - oi * dr
                    q[j] += orr * orr + oi * oi

    return SimpleNamespace(read_waves=read_waves, project=project, correct=correct, spread=spread,
                           probe_sums=probe_sums)


def load_kernels() -> SimpleNamespace:
    """Import numba and compile (or load from its cache) the kernels, once per process; raises ImportError
    without numba.

    A host calls this at start-up to keep numba's import and the kernels'
    loading (≈ 0.5 s with a warm cache) out of its first reconstruction.
    Where numba cannot write its cache (a read-only install with no user
    cache directory) the kernels are compiled without one.
    """
    global _KERNELS
    if _KERNELS is None:
        try:
            kernels = _compile(cache=True)
            _warm(kernels)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            kernels = _compile(cache=False)
            _warm(kernels)
        _KERNELS = kernels
    return _KERNELS


def _warm(k: SimpleNamespace) -> None:
    """Call each kernel once on a tiny input: compiles it (or loads it from the cache) now, not mid-sweep."""
    canvas = np.zeros((6, 12), np.float32)
    probe = np.ones((4, 8), np.float32)
    rows, cols = np.zeros(1, np.int64), np.zeros(1, np.int64)
    f = np.zeros(1, np.float32)
    waves = np.zeros((1, 4, 8), np.float32)
    k.read_waves(canvas, probe, rows, cols, f, f, waves, waves, True)
    k.project(waves.reshape(-1), np.zeros(16, np.float32), np.float32(1.0), np.float32(TINY))
    k.correct(probe, waves)
    k.spread(canvas, waves, rows, cols, f, f)
    k.probe_sums(waves, waves, probe.copy(), np.zeros((4, 4), np.float32))


def _floats(a: np.ndarray) -> np.ndarray:
    """A complex64 array's interleaved float32 view (the kernels' layout); writing it writes ``a``."""
    return a.view(np.float32)


class NumbaBackend(NumpyBackend):
    """The numpy backend with its batch step in compiled loops (``run_batch``); the state and the rest are numpy's."""

    name = "numba"

    def __init__(self, obj: np.ndarray, probe: np.ndarray, **kwargs: Any) -> None:
        kwargs.pop("threads", None)  # one thread: the kernels leave nothing for a second to split
        super().__init__(obj, probe, **kwargs)
        self._k = load_kernels()

    def run_batch(self, measured: np.ndarray, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray) -> float:
        """``NumpyBackend.run_batch`` with the read, the projection and the write compiled; returns Σ misfit."""
        N, k = self.N, self._k
        n2 = np.float32(N**2)
        fy = np.ascontiguousarray(weights[:, 2] + weights[:, 3], dtype=np.float32)
        fx = np.ascontiguousarray(weights[:, 1] + weights[:, 3], dtype=np.float32)
        rows, cols = np.ascontiguousarray(rows, np.int64), np.ascontiguousarray(cols, np.int64)
        canvas = _floats(self.obj)
        waves = np.empty((len(rows), N, N), np.complex64)
        patches = np.empty_like(waves) if self.refine_probe else waves[:0]
        k.read_waves(canvas, _floats(self.probe), rows, cols, fy, fx, _floats(waves), _floats(patches),
                     self.refine_probe)
        spectrum = FFT.fft2(waves, norm="forward", **_IN_PLACE)  # Ψ/N², as NumpyBackend._step
        misfit = float(k.project(_floats(spectrum).reshape(-1), np.ascontiguousarray(measured, np.float32).reshape(-1),
                                 np.float32(1) / n2, np.float32(TINY) / n2)) * float(n2) ** 2
        dpsi = np.ascontiguousarray(FFT.ifft2(spectrum, **_IN_PLACE), dtype=np.complex64)  # F⁻¹(Ψ' − Ψ)/N²
        delta = dpsi.copy() if self.refine_probe else dpsi  # the probe step needs dpsi itself
        k.correct(_floats(self._factor()), _floats(delta))
        k.spread(canvas, _floats(delta), rows, cols, fy, fx)
        if self.refine_probe:
            self._probe_step(patches, dpsi)
        return misfit

    def _probe_step(self, patches: np.ndarray, dpsi: np.ndarray) -> None:
        """``NumpyBackend._probe_update`` (scale N²) with its two sums over the batch in one compiled pass."""
        N = self.N
        num = np.empty((N, N), np.complex64)
        den = np.empty((N, N), np.float32)
        self._k.probe_sums(_floats(patches), _floats(dpsi), _floats(num), den)
        a = self.probe_alpha
        self.probe = self.probe + (num * np.float32(N**2) / ((1 - a) * den + a * np.max(den))).astype(np.complex64)
