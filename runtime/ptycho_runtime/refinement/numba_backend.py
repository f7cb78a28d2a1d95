"""The numpy backend's batch update in numba's compiled loops (``reconstruction.compiled``): the same update, faster.

The update is the numpy backend's (``numpy_backend``'s docstring), term for
term and in the same order of operations, so the two agree to float32
rounding (a test holds them within 1e-4 after 20 sweeps). Everything else
(momentum, the probe step's final division, the parallel batching) is
inherited. ``backend="auto"`` takes this backend on the CPU where numba is
importable, else numpy (``engine.make_backend``). ≈ 45 ms per sweep of
1,000 frames at N = 64 against numpy's ≈ 78 (docs/fidelity.md, "Compiled passes").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..reconstruction.compiled import load_kernels
from .numpy_backend import FFT, TINY, NumpyBackend

_IN_PLACE: dict[str, Any] = {} if FFT is np.fft else {"overwrite_x": True}  # scipy's FFT may reuse its input


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
