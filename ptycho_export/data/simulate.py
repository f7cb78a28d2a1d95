"""Synthetic ptychography: objects, probe, scan positions and noisy diffraction.

The forward model is the numpy reference for the physics every other part of
the project must agree with (the torch model is tested against it):

    patch[r, c] = obj[y - (N-1)/2 + r, x - (N-1)/2 + c]  (bilinear, 0 outside)
    amplitude   = |fftshift(fft2(patch * probe))| / N     (Parseval-preserving)
    counts      ~ Poisson((amplitude * s)**2),  s = sqrt(nphotons) / (N/2)
    diffraction = sqrt(counts) / s                          (normalised units)

With the probe normalised to Σ|p|² = (N/2)² and |obj| ≈ 1, a pattern then
holds about ``nphotons`` photons and Σ diffraction² ≈ (N/2)², which is the
PtychoPINN normalisation.  Everything is numpy only and seeded through
``numpy.random.default_rng`` so a seed reproduces a dataset bit for bit.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from ptycho_runtime.files.npz import normalization_factor  # noqa: F401 - one definition, re-exported
from ptycho_runtime.reconstruction.geometry import frame_centre, frame_origin
from ptycho_runtime.reconstruction.grouping import checked_coordinates

from .container import PtychoData

OBJECT_KINDS: Tuple[str, ...] = ("lines", "grf")

SizeLike = Union[int, Sequence[int]]

# Keep the gather of one extract_patches chunk near this many complex samples
# (~32 MB of complex64 per corner) so memory stays flat for n = 10^4 patterns.
_PATCH_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------
# objects
# ----------------------------------------------------------------------------


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic Gaussian blur by multiplying the spectrum (no scipy needed)."""
    ky = np.fft.fftfreq(img.shape[0])[:, None]
    kx = np.fft.rfftfreq(img.shape[1])[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma) ** 2 * (kx**2 + ky**2))
    return np.fft.irfft2(np.fft.rfft2(img) * transfer, s=img.shape)


def _normalise01(img: np.ndarray) -> np.ndarray:
    lo, hi = float(img.min()), float(img.max())
    if hi - lo <= 0:
        return np.zeros_like(img)
    return (img - lo) / (hi - lo)


def _lines_object(size: int, rng: np.random.Generator) -> np.ndarray:
    """Random straight lines, blurred at several scales.

    Lines are drawn on a canvas padded by the widest blur so that the
    periodic FFT blur does not wrap lines across the edges, then cropped.
    Amplitude comes from the fine-scale blur (sharp edges to resolve), phase
    from the coarse-scale blur (smooth, larger structures), both in [0, 1]
    before mapping.  Lines absorb and delay: amplitude 0.95 on the background
    falling to 0.5 on the densest lines (0.95 rather than 1 so a sigmoid
    reaches it without saturating), phase 0 rising to π/2.  A mostly
    transparent background keeps mean Σ diffraction² near (N/2)².
    """
    sigmas = (1.0, 2.0, 4.0)
    pad = int(np.ceil(3 * max(sigmas)))
    S = size + 2 * pad
    n_lines = max(8, int(round(size * size / 600)))
    centres = rng.uniform(0, S, size=(n_lines, 2))
    angles = rng.uniform(0, np.pi, size=n_lines)
    lengths = rng.uniform(0.1, 0.5, size=n_lines) * size
    weights = rng.uniform(0.5, 1.0, size=n_lines)
    # Sample each line every half pixel: (n_lines, n_samples) points.
    n_samples = int(np.ceil(2 * 0.5 * size)) + 1
    t = np.linspace(-0.5, 0.5, n_samples)[None, :] * lengths[:, None]
    rows = np.round(centres[:, :1] + t * np.sin(angles)[:, None]).astype(np.int64)
    cols = np.round(centres[:, 1:] + t * np.cos(angles)[:, None]).astype(np.int64)
    inside = (rows >= 0) & (rows < S) & (cols >= 0) & (cols < S)
    flat = (rows * S + cols)[inside]
    w = np.broadcast_to(weights[:, None], rows.shape)[inside]
    canvas = np.zeros(S * S)
    np.maximum.at(canvas, flat, w)
    canvas = canvas.reshape(S, S)

    fine = sum(_gaussian_blur(canvas, s) for s in sigmas[:2])
    coarse = sum(_gaussian_blur(canvas, s) for s in sigmas[1:])
    crop = (slice(pad, pad + size), slice(pad, pad + size))
    amp = 0.95 - 0.45 * _normalise01(fine[crop])
    phase = 0.5 * np.pi * _normalise01(coarse[crop])
    return amp * np.exp(1j * phase)


def _grf_object(size: int, rng: np.random.Generator) -> np.ndarray:
    """Two Gaussian random fields (amplitude and phase) with a power-law spectrum.

    Power spectrum ∝ (k² + k0²)^(-3/2) (structure at every scale, like many
    real samples) times a Gaussian cut-off at a 4-pixel period so the field
    carries no pixel-level noise.  Each field is standardised and squashed with
    tanh: amplitude in (0.5, 1), phase in (-π/2, π/2).
    """
    ky = np.fft.fftfreq(size)[:, None]
    kx = np.fft.fftfreq(size)[None, :]
    k2 = kx**2 + ky**2
    k0 = 2.0 / size
    filt = (k2 + k0**2) ** (-3.0 / 4.0) * np.exp(-k2 / (2 * 0.125**2))
    filt[0, 0] = 0.0
    noise = rng.standard_normal((2, size, size))
    fields = np.fft.ifft2(np.fft.fft2(noise) * filt).real
    fields -= fields.mean(axis=(-2, -1), keepdims=True)
    fields /= fields.std(axis=(-2, -1), keepdims=True) + 1e-12
    amp = 0.75 + 0.25 * np.tanh(0.75 * fields[0])
    phase = 0.5 * np.pi * np.tanh(0.75 * fields[1])
    return amp * np.exp(1j * phase)


def make_object(kind: str, size: int, seed: int = 0) -> np.ndarray:
    """Synthetic complex object, complex64 (size, size).

    Amplitude stays within [0.5, 1] so a sigmoid amplitude head can represent
    it; phase stays within [-π/2, π/2] so no phase wrapping blurs metrics.

    Args:
        kind: one of ``OBJECT_KINDS`` ("lines" or "grf").
        size: side length in pixels (≥ 8).
        seed: seed for ``numpy.random.default_rng``.
    """
    if kind not in OBJECT_KINDS:
        raise ValueError(f"unknown object kind {kind!r}; allowed kinds: {', '.join(OBJECT_KINDS)}")
    size = int(size)
    if size < 8:
        raise ValueError(f"object size must be >= 8 pixels (got {size})")
    rng = np.random.default_rng(seed)
    obj = _lines_object(size, rng) if kind == "lines" else _grf_object(size, rng)
    return obj.astype(np.complex64)


# ----------------------------------------------------------------------------
# probe, positions, patches, physics
# ----------------------------------------------------------------------------


def _check_even_N(N: int) -> int:
    if isinstance(N, bool) or int(N) != N or N < 8 or int(N) % 2:
        raise ValueError(f"N must be an even integer >= 8 (got {N!r})")
    return int(N)


def default_probe(N: int, radius_fraction: float = 0.25, defocus: float = 4.0) -> np.ndarray:
    """Band-limited probe: an apodised disk in Fourier space, inverse-FFT'd.

    This is the standard "lens aperture" probe: the disk is the pupil, its
    inverse transform an Airy-like spot centred at pixel (N/2, N/2).  A
    quadratic pupil phase (``defocus`` radians at the disk edge) spreads the
    spot and curves its phase, so neighbouring scan positions overlap and the
    probe is not trivially real.  The pupil edge is softened over one pixel
    to keep Airy side lobes (which wrap around the patch) small.

    The spot width scales as N / (pupil radius), so the pupil radius is held
    at ``1.5 / radius_fraction`` Fourier pixels (capped at 3N/8) whatever N is:
    the probe then covers the same fraction of the patch for N = 64, 128, 256.

    Args:
        N: patch size (even, ≥ 8).
        radius_fraction: radius holding ~90% of the probe intensity, as a
            fraction of N (calibrated at the default defocus; 0.25 → N/4,
            about 1.3% of the intensity within N/16 of the patch border).
        defocus: quadratic pupil phase at the disk edge, radians (0 → real
            Airy spot, narrower than ``radius_fraction`` says).

    Returns:
        complex64 (N, N) with Σ|p|² = (N/2)².
    """
    N = _check_even_N(N)
    if not (0.0 < radius_fraction <= 1.0):
        raise ValueError(f"radius_fraction must be in (0, 1] (got {radius_fraction!r})")
    radius = min(1.5 / radius_fraction, 0.375 * N)
    f = np.fft.fftfreq(N) * N
    rho = np.hypot(f[None, :], f[:, None])
    soft = 1.0
    pupil = np.clip((radius + soft / 2 - rho) / soft, 0.0, 1.0)
    pupil = pupil * np.exp(1j * defocus * (rho / radius) ** 2)
    probe = np.fft.fftshift(np.fft.ifft2(pupil))
    probe *= (N / 2) / np.sqrt(np.sum(np.abs(probe) ** 2))
    return probe.astype(np.complex64)


def _object_shape(object_size: SizeLike) -> Tuple[int, int]:
    if np.ndim(object_size) == 0:
        return int(object_size), int(object_size)
    shape = tuple(int(s) for s in object_size)
    if len(shape) != 2:
        raise ValueError(f"object_size must be an int or (rows, cols) (got {object_size!r})")
    return shape  # type: ignore[return-value]


def scan_positions(
    object_size: SizeLike,
    N: int,
    kind: str = "grid",
    step: Optional[float] = None,
    n: Optional[int] = None,
    seed: int = 0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Scan positions (patch centres) that keep every N×N patch inside the object.

    Valid centres lie in [(N−1)/2, size − 1 − (N−1)/2] along each axis.

    Args:
        object_size: object side (int) or (rows, cols).
        N: patch size.
        kind: "grid" — a raster with ``step`` pixels (default N/4) between
            positions, centred in the valid range, row by row (x fastest);
            "random" — ``n`` positions uniform in the valid range (default n:
            as many as the default grid would have).
        step: grid step in pixels (grid only).
        n: number of positions (random only).
        seed: seed for the random kind.

    Returns:
        (xcoords, ycoords) float64, each (n,).
    """
    N = _check_even_N(N)
    rows, cols = _object_shape(object_size)
    if rows < N or cols < N:
        raise ValueError(f"object of shape ({rows}, {cols}) is smaller than one {N}x{N} patch")
    lo = frame_centre(N)
    hi_y, hi_x = rows - 1 - lo, cols - 1 - lo
    if kind == "grid":
        if n is not None:
            raise ValueError("n is only used by kind='random'; a grid is set by its step")
        step = N / 4 if step is None else float(step)
        if not step > 0:
            raise ValueError(f"step must be > 0 (got {step!r})")

        def axis(hi: float) -> np.ndarray:
            count = int(np.floor((hi - lo) / step + 1e-9)) + 1
            margin = (hi - lo - (count - 1) * step) / 2
            return lo + margin + step * np.arange(count)

        yy, xx = np.meshgrid(axis(hi_y), axis(hi_x), indexing="ij")
        return xx.ravel().astype(np.float64), yy.ravel().astype(np.float64)
    if kind == "random":
        if step is not None:
            raise ValueError("step is only used by kind='grid'")
        if n is None:
            x, _ = scan_positions((rows, cols), N, "grid")
            n = x.size
        if int(n) < 1:
            raise ValueError(f"n must be >= 1 (got {n!r})")
        rng = np.random.default_rng(seed)
        y = rng.uniform(lo, hi_y, size=int(n))
        x = rng.uniform(lo, hi_x, size=int(n))
        return x, y
    raise ValueError(f"unknown scan kind {kind!r}; allowed: 'grid', 'random'")


def extract_patches(obj: np.ndarray, xcoords: np.ndarray, ycoords: np.ndarray, N: int) -> np.ndarray:
    """Bilinear N×N patches centred at (x, y): patch[r, c] = obj[y - (N-1)/2 + r, x - (N-1)/2 + c].

    The centre is frame pixel (N−1)/2, the PtychoPINN/ptychodus convention
    (``ptycho_runtime.reconstruction.geometry``).

    Pixels outside the object read as 0.  Integer positions are exact copies
    (the other three bilinear corners get weight 0 and are skipped).  The
    gather is vectorised over patterns, in chunks to bound memory.

    Returns:
        complex64 (n, N, N).
    """
    obj = np.asarray(obj)
    if obj.ndim != 2:
        raise ValueError(f"obj must be 2-D (rows, cols); got shape {obj.shape}")
    N = int(N)
    if N < 1:
        raise ValueError(f"N must be >= 1 (got {N})")
    x, y = checked_coordinates(xcoords, ycoords)
    obj = obj.astype(np.complex64, copy=False)
    H, W = obj.shape
    out = np.empty((x.size, N, N), dtype=np.complex64)
    start_x, start_y = frame_origin(x, N), frame_origin(y, N)
    r0 = np.floor(start_y)
    c0 = np.floor(start_x)
    fy = (start_y - r0).astype(np.float32)
    fx = (start_x - c0).astype(np.float32)
    ar = np.arange(N, dtype=np.int64)
    chunk = max(1, _PATCH_CHUNK_ELEMENTS // (N * N))
    for s in range(0, x.size, chunk):
        sl = slice(s, min(s + chunk, x.size))
        acc = np.zeros((sl.stop - sl.start, N, N), dtype=np.complex64)
        for dr in (0, 1):
            wy = fy[sl] if dr else 1 - fy[sl]
            if not np.any(wy):
                continue
            rows = r0[sl].astype(np.int64)[:, None] + dr + ar[None, :]
            row_ok = (rows >= 0) & (rows < H)
            rows = np.clip(rows, 0, H - 1)
            for dc in (0, 1):
                wx = fx[sl] if dc else 1 - fx[sl]
                if not np.any(wx):
                    continue
                cols = c0[sl].astype(np.int64)[:, None] + dc + ar[None, :]
                col_ok = (cols >= 0) & (cols < W)
                cols = np.clip(cols, 0, W - 1)
                vals = obj[rows[:, :, None], cols[:, None, :]]
                if not (row_ok.all() and col_ok.all()):
                    vals[~(row_ok[:, :, None] & col_ok[:, None, :])] = 0
                vals *= (wy * wx)[:, None, None]
                acc += vals
        out[sl] = acc
    return out


def far_field_amplitude(patches: np.ndarray, probe: np.ndarray) -> np.ndarray:
    """Far-field diffraction amplitude of exit waves ``patches * probe``.

    ``|fftshift(fft2(patch * probe))| / N`` over the last two axes, i.e. the
    square root of fftshift(|fft2|²)/(N·N).  The 1/N factor makes it unitary
    (Parseval: Σ amplitude² = Σ |patch·probe|²) and the DC term sits at
    pixel (N/2, N/2).  Returns float32 with the shape of the broadcast input.
    """
    patches = np.asarray(patches)
    probe = np.asarray(probe)
    if patches.ndim < 2 or patches.shape[-1] != patches.shape[-2]:
        raise ValueError(f"patches must end in a square (N, N); got shape {patches.shape}")
    if probe.shape != patches.shape[-2:]:
        raise ValueError(f"probe has shape {probe.shape}; expected {patches.shape[-2:]}")
    N = patches.shape[-1]
    exit_wave = patches.astype(np.complex64, copy=False) * probe.astype(np.complex64, copy=False)
    spectrum = np.fft.fftshift(np.fft.fft2(exit_wave, axes=(-2, -1)), axes=(-2, -1))
    return (np.abs(spectrum) / np.float32(N)).astype(np.float32)


def intensity_scale_from_nphotons(nphotons: float, N: int) -> float:
    """PtychoPINN intensity scale s = sqrt(nphotons) / (N/2).

    A normalised amplitude X (Σ X² ≈ (N/2)²) times s has Σ (sX)² ≈ nphotons.
    """
    if not np.isfinite(nphotons) or nphotons <= 0:
        raise ValueError(f"nphotons must be a positive finite number (got {nphotons!r})")
    if N <= 0:
        raise ValueError(f"N must be > 0 (got {N!r})")
    return float(np.sqrt(nphotons) / (N / 2))


# ----------------------------------------------------------------------------
# whole scan
# ----------------------------------------------------------------------------


def simulate_scan(
    N: int = 64,
    object_kind: str = "lines",
    object_size: Optional[int] = None,
    scan: str = "grid",
    step: Optional[float] = None,
    n_positions: Optional[int] = None,
    nphotons: float = 1e9,
    seed: int = 0,
    probe: Optional[np.ndarray] = None,
) -> PtychoData:
    """Simulate a noisy ptychographic scan with its ground truth.

    Defaults: object_size = 5·N (320 px for N=64), grid step = N/4 (16 px),
    giving a 17×17 raster = 289 patterns for N=64 (same count for any N);
    ``scan="random"`` uses ``n_positions`` (default: the same 289).
    The probe defaults to ``default_probe(N)``; a given probe is used as is
    (not renormalised).  Photon counts are Poisson with mean
    (far_field_amplitude · s)², s = intensity_scale_from_nphotons(nphotons, N);
    stored diffraction = sqrt(counts) / s.

    Returns:
        PtychoData with ``object`` and ground-truth ``patches`` filled in and
        ``scan_index`` all zero.  The object, positions and noise all derive
        from ``seed`` (separate streams so changing the scan keeps the object).
    """
    N = _check_even_N(N)
    size = 5 * N if object_size is None else int(object_size)
    obj_seq, pos_seq, noise_seq = np.random.SeedSequence(seed).spawn(3)
    obj = make_object(object_kind, size, seed=int(obj_seq.generate_state(1)[0]))
    if probe is None:
        probe = default_probe(N)
    probe = np.asarray(probe, dtype=np.complex64)
    if probe.shape != (N, N):
        raise ValueError(f"probe has shape {probe.shape}; expected (N, N) = ({N}, {N})")
    if scan == "grid":
        x, y = scan_positions(size, N, "grid", step=step)
        if n_positions is not None:
            raise ValueError("n_positions is only used with scan='random'")
    else:
        x, y = scan_positions(size, N, scan, n=n_positions, seed=int(pos_seq.generate_state(1)[0]))
    patches = extract_patches(obj, x, y, N)
    amplitude = far_field_amplitude(patches, probe).astype(np.float64)
    s = intensity_scale_from_nphotons(nphotons, N)
    noise_rng = np.random.default_rng(noise_seq)
    counts = noise_rng.poisson((amplitude * s) ** 2)
    diffraction = (np.sqrt(counts) / s).astype(np.float32)
    return PtychoData(
        diffraction=diffraction,
        xcoords=x,
        ycoords=y,
        probe=probe,
        object=obj,
        patches=patches,
        scan_index=np.zeros(x.size, dtype=np.int64),
    )
