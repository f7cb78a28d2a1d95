"""The scan at half resolution: the first sweeps of a refinement, at about a third of a full sweep's cost.

Why: what sweeps take longest to find is the object's slowly varying phase,
and it lives in the central band of every frame's far field. The central
n×n pixels (n = N/f) of a frame are, exactly, the far field of the exit wave
band-limited to that band and sampled every f pixels. So on a canvas of
f×-larger pixels, with each frame cropped to its central band and the probe
band-limited to it, a sweep is n² FFTs and windows instead of N²: at N = 64
and f = 2, about 31 ms against 85 ms per sweep of 1,000 frames. In the
default 16 sweeps, 4 run here (after the start's two trial sweeps at full
resolution), and with the 10 after them the refinement reaches what 16 at full
resolution reach in about 16 % less time (docs/fidelity.md, "A coarse level
first"). A coarser level (f = 4, 16² frames of a 64² detector) cut too much of
the probe's own far field (phase SSIM 0.931 against 0.972 at f = 2, 8 coarse and 8 full
sweeps from a flat start) and saved little: at that size the cost of a
sweep is its Python, not its arrays.

The units follow the engine's (``Refiner.add_frames``): a frame's amplitude is
|F ψ| / N for the unnormalised N×N DFT F. With ψ_c = F_n⁻¹((n/N)·crop(F ψ)),
the cropped amplitude is |F_n ψ_c| / n, so the coarse probe is made by the same
rule, and ψ_c = P_c·O_c holds exactly for a flat object and approximately where
the object varies within the probe's band. Coarse canvas pixel (j, i) is full
pixel (f·j, f·i).

Back on the full grid the coarse stage's correction (its object less the
coarse start it began from) is interpolated and added to the full-resolution
start, which keeps the start's own fine detail (the network's). A coarse
probe refined there goes back the same way, into the probe's central band of
the far field (``CoarseScan.lift_probe``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from ..reconstruction.geometry import frame_centre
from ..reconstruction.stitching import Reconstruction
from .engine import Refiner

FACTOR = 2
"""Full pixels per coarse pixel, along each axis."""
MIN_FRAME = 16
"""The smallest coarse frame (N / FACTOR) worth a level: below it the probe's own far field is cut."""


def _band(N: int, n: int) -> tuple[slice, slice]:
    """The rows and columns of the central n×n band of a centred N×N far field (DC at N/2; n even)."""
    c0 = N // 2 - n // 2
    return slice(c0, c0 + n), slice(c0, c0 + n)


def crop_band(amplitude: np.ndarray, n: int) -> np.ndarray:
    """The central n×n band of centred frames [..., N, N] (DC at N/2; n even): DC stays at n/2."""
    rows, cols = _band(amplitude.shape[-1], n)
    return np.ascontiguousarray(amplitude[..., rows, cols])


def band_limited_probe(probe: np.ndarray, n: int) -> np.ndarray:
    """The probe seen through the central n×n band of the far field, on the n×n coarse grid (module docstring)."""
    N = probe.shape[-1]
    spectrum = np.fft.fftshift(np.fft.fft2(np.asarray(probe, dtype=np.complex128)))
    band = np.fft.ifftshift(crop_band(spectrum, n))
    return (np.fft.ifft2(band) * (n / N)).astype(np.complex64)


def decimate(obj: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Every f-th pixel of ``obj`` on a canvas of ``shape``; at f = 2 (``FACTOR``), after a [1, 2, 1]/4 smoothing.

    Pixels the full canvas does not reach are 1 (free space, as the engine's uncovered pixels).
    """
    a = np.asarray(obj, dtype=np.complex64)
    if f == 2:  # the triangle filter centred on the kept pixel: what the band crop keeps, roughly
        p = np.pad(a, 1, mode="edge")
        a = (p[:-2] + 2 * p[1:-1] + p[2:]) * np.float32(0.25)
        a = (a[:, :-2] + 2 * a[:, 1:-1] + a[:, 2:]) * np.float32(0.25)
    kept = a[::f, ::f]
    out = np.ones(shape, np.complex64)
    out[:kept.shape[0], :kept.shape[1]] = kept[:shape[0], :shape[1]]
    return out


def upsample(coarse: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear interpolation of a coarse canvas onto the full one: full pixel i is coarse pixel i/f."""
    def axis(length: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.arange(length) / f
        i0 = np.minimum(np.floor(x).astype(np.int64), size - 2)
        return i0, i0 + 1, (x - i0).astype(np.float32)

    r0, r1, wr = axis(shape[0], coarse.shape[0])
    c0, c1, wc = axis(shape[1], coarse.shape[1])
    rows = coarse[r0] * (1 - wr)[:, None] + coarse[r1] * wr[:, None]
    return (rows[:, c0] * (1 - wc) + rows[:, c1] * wc).astype(np.complex64)


def usable(N: int, factor: int = FACTOR) -> bool:
    """Whether frames of N pixels have a coarse level: N/factor an even whole number of at least ``MIN_FRAME``."""
    n, rest = divmod(N, factor)
    return rest == 0 and n % 2 == 0 and n >= MIN_FRAME


class CoarseScan:
    """One scan's frames, probe and canvas at ``factor``× coarser pixels, and the way back to full resolution.

    ``recon`` is the full-resolution start's grid, ``amplitude`` [n, N, N]
    the frames (DC at N/2) in the probe's units, ``starts`` [n, 2] each
    frame's (x, y) origin on that grid, ``probe`` [N, N] in the amplitudes'
    units (``probe_scale.normalise_probe``).
    """

    def __init__(self, recon: Reconstruction, amplitude: np.ndarray, starts: np.ndarray, probe: np.ndarray,
                 factor: int = FACTOR) -> None:
        N = amplitude.shape[-1]
        if not usable(N, factor):
            raise ValueError(f"frames of {N} pixels have no coarse level at factor {factor} (usable() says which)")
        self.factor = int(factor)
        self.n = N // factor
        self.full_shape = recon.object.shape
        H, W = self.full_shape
        self.shape = (H // factor + 2, W // factor + 2)  # every full frame's coarse window fits, with its extra row
        self.amplitude = crop_band(np.asarray(amplitude, dtype=np.float32), self.n)
        self.probe = band_limited_probe(probe, self.n)
        self.starts = np.asarray(starts, dtype=np.float64) / factor
        self.positions = self.starts + frame_centre(self.n)  # on a canvas whose coordinates start at 0
        weight = np.zeros(self.shape, np.float32)
        kept = recon.weight[::factor, ::factor]
        weight[:kept.shape[0], :kept.shape[1]] = kept
        self._grid = replace(recon, object=np.ones(self.shape, np.complex64), weight=weight,
                             x_coords=np.arange(self.shape[1], dtype=np.float64),
                             y_coords=np.arange(self.shape[0], dtype=np.float64), probe=None, refinement=None)

    def refiner(self, obj: np.ndarray, **options: Any) -> Refiner:
        """A ``Refiner`` on the coarse canvas, started from ``obj`` (full resolution) decimated, its frames added."""
        coarse = np.where(self._grid.covered, decimate(obj, self.factor, self.shape), np.complex64(1.0))
        start = replace(self._grid, object=coarse)  # as the Refiner starts: 1 where uncovered
        return Refiner(start, self.probe, **options).add_frames(self.amplitude, self.positions)

    def lift(self, obj: np.ndarray, coarse_start: np.ndarray, coarse_refined: np.ndarray) -> np.ndarray:
        """``obj`` (full resolution) plus the coarse stage's correction, interpolated onto the full grid."""
        change = upsample(coarse_refined - coarse_start, self.factor, self.full_shape)
        return np.asarray(obj, dtype=np.complex64) + change

    def lift_probe(self, probe: np.ndarray, coarse_start: np.ndarray, coarse_refined: np.ndarray) -> np.ndarray:
        """``probe`` [N, N] with its central band of the far field moved as the coarse level moved the coarse probe.

        The inverse of ``band_limited_probe`` on the change: the band outside the
        crop is the probe's own, the band inside it takes the coarse refinement.
        """
        N = np.shape(probe)[-1]
        change = np.fft.fftshift(np.fft.fft2(np.asarray(coarse_refined, np.complex128)
                                             - np.asarray(coarse_start, np.complex128))) * (N / self.n)
        spectrum = np.fft.fftshift(np.fft.fft2(np.asarray(probe, dtype=np.complex128)))
        spectrum[_band(N, self.n)] += change
        return np.fft.ifft2(np.fft.ifftshift(spectrum)).astype(np.complex64)

