"""Exit waves P·o_j and far-field misfits of many frames at once, for the fits and checks around the sweeps.

The sweeps' update lives in the backends. The slow-phase fit
(``phase_field``) and the start's and the amplitude prior's checks
(``inference.scan_refinement``) need the same bilinear read, and the far
field, of the scan's frames or a sample of them. Read here in chunks of
``CHUNK`` frames (a few MB at 64², in cache), by numba's compiled read where
numba is installed (``reconstruction.compiled``), else by numpy's window view: the
same values to float32 rounding. A frame-by-frame loop (``epie.far_field_misfit``,
the reference) took 73 ms for the prior's two checks on 256 frames.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..reconstruction.compiled import available_kernels
from .batching import fractions, window_corners
from .numpy_backend import FFT, interpolate_windows, window_view

CHUNK = 64
"""Frames whose exit waves are held at once: a few MB at 64², in cache (2× faster than 256), whatever the scan."""


def exit_waves(obj: np.ndarray, probe: np.ndarray, rows: np.ndarray, cols: np.ndarray,
               weights: np.ndarray) -> np.ndarray:
    """[B, N, N] complex64: P·o_j for frames whose windows have corners (rows, cols) and bilinear ``weights``
    [B, 4] (``batching.window_corners``), read from the canvas ``obj`` as the sweeps read it."""
    canvas = np.ascontiguousarray(obj, dtype=np.complex64)
    P = np.ascontiguousarray(probe, dtype=np.complex64)
    N = P.shape[0]
    k = available_kernels()
    if k is None:
        waves = interpolate_windows(window_view(canvas, N)[rows, cols], weights)
        waves *= P
        return waves
    fy, fx = fractions(weights)
    waves = np.empty((len(rows), N, N), np.complex64)
    floats = waves.view(np.float32)
    k.read_waves(canvas.view(np.float32), P.view(np.float32), np.ascontiguousarray(rows, np.int64),
                 np.ascontiguousarray(cols, np.int64), fy, fx, floats, floats[:0], False)
    return waves


def wave_misfits(waves: np.ndarray, amplitude: np.ndarray) -> np.ndarray:
    """[B] float64: Σ(|F(ψ_j)|/N − A_j)² per frame, for exit waves ψ [B, N, N] and amplitudes A (DC at N/2)."""
    N = waves.shape[-1]
    model = np.abs(FFT.fft2(waves, norm="forward"))
    model *= np.float32(N)
    model -= np.fft.ifftshift(np.asarray(amplitude, np.float32), axes=(-2, -1))
    return np.einsum("jpq,jpq->j", model, model, dtype=np.float64)


def frame_misfits(obj: np.ndarray, amplitude: np.ndarray, probe: np.ndarray, starts: np.ndarray,
                  frames: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-frame Σ(|F(P·o_j)|/N − A_j)² of ``obj`` against the measured ``amplitude`` [n, N, N] (DC at N/2), chunked.

    ``starts`` [n, 2] are (column, row) canvas coordinates of each frame's
    pixel (0, 0); ``frames`` (indices) picks a subset, all by default.
    ``epie.far_field_misfit`` is the same sum, frame by frame, over n·N².
    """
    chosen = np.arange(amplitude.shape[0]) if frames is None else np.asarray(frames)
    rows, cols, weights = window_corners(np.asarray(starts, dtype=np.float64)[chosen])
    out = np.empty(len(chosen))
    for lo in range(0, len(chosen), CHUNK):
        part = slice(lo, lo + CHUNK)
        out[part] = wave_misfits(exit_waves(obj, probe, rows[part], cols[part], weights[part]),
                                 amplitude[chosen[part]])
    return out
