"""A scan as a real instrument records it: the project's realistic benchmark for reconstruction quality.

``simulate_scan`` makes the friendly, pre-normalised scans that tests need.
Users' data is not like that, and a model is judged on data like theirs:

- **probe**: a Fresnel zone plate with a central stop, out of focus — a
  ring-shaped spot whose far field is an annulus (the dark centre of real
  zone-plate diffraction), not the compact Airy spot of ``default_probe``;
- **scan**: a Fermat spiral (the scan most hard-X-ray beamlines use) with
  about 70% linear overlap between neighbours;
- **object**: "dead leaves" — overlapping disks of random size, amplitude and
  phase, with sharp edges at every scale (phase within ±0.4π ≈ ±1.26 rad);
- **photons**: about 1e6 per frame, Poisson noise;
- **file conventions** (``save_realistic_npz``): ``diffraction`` holds
  sqrt(counts) in photon units, ``probeGuess`` carries an arbitrary absolute
  instrument scale (Σ|P|² = 1e14, unrelated to the photon count), positions
  name frame pixel (N−1)/2, and ``objectGuess`` is the true object.

The forward model is the package's (``extract_patches``, unitary far field);
tests check it against an independent textbook model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from .container import PtychoData
from .simulate import extract_patches, far_field_amplitude

GOLDEN_ANGLE = np.pi * (3.0 - np.sqrt(5.0))
PROBE_FILE_ENERGY = 1e14  # Σ|P|² of the probe as written to the file: an instrument's arbitrary scale


def zone_plate_probe(N: int = 64, outer_radius: float = 0.25, stop_fraction: float = 0.45,
                     defocus: float = 12.0) -> np.ndarray:
    """Out-of-focus zone-plate probe with a central stop, Σ|P|² = (N/2)².

    The pupil is an annulus (outer radius ``outer_radius``·N Fourier pixels,
    inner radius ``stop_fraction`` of it, soft edges) with a defocus phase of
    ``defocus`` radians at the rim. Geometric optics gives a spot of radius
    N·defocus/(π·outer_radius·N) pixels: about 15 px at the defaults for N=64,
    a ring with a dimmer centre.
    """
    r_out = outer_radius * N
    r_in = stop_fraction * r_out
    f = np.fft.fftfreq(N) * N
    rho = np.hypot(f[None, :], f[:, None])
    pupil = np.clip(r_out + 0.5 - rho, 0.0, 1.0) * np.clip(rho - r_in + 0.5, 0.0, 1.0)
    pupil = pupil * np.exp(1j * defocus * (rho / r_out) ** 2)
    probe = np.fft.fftshift(np.fft.ifft2(pupil))
    probe *= (N / 2) / np.sqrt(np.sum(np.abs(probe) ** 2))
    return probe.astype(np.complex64)


def probe_diameter(probe: np.ndarray, fraction: float = 0.9) -> float:
    """Diameter (pixels) of the centred disk holding ``fraction`` of the probe's intensity."""
    p = np.abs(np.asarray(probe)) ** 2
    N = p.shape[-1]
    yy, xx = np.mgrid[:N, :N]
    cy, cx = (np.sum(p * yy) / p.sum()), (np.sum(p * xx) / p.sum())
    r = np.hypot(yy - cy, xx - cx).ravel()
    order = np.argsort(r)
    cum = np.cumsum(p.ravel()[order]) / p.sum()
    return 2.0 * float(r[order][np.searchsorted(cum, fraction)])


def fermat_spiral(n: int, step: float, centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """``n`` Fermat-spiral positions (x, y) about ``centre`` with nearest-neighbour spacing ≈ ``step``."""
    k = np.arange(n, dtype=np.float64)
    r = step / np.sqrt(np.pi) * np.sqrt(k + 0.5) * 1.05
    theta = k * GOLDEN_ANGLE
    return centre[0] + r * np.cos(theta), centre[1] + r * np.sin(theta)


def dead_leaves_object(size: int, seed: int, max_phase: float = 0.4 * np.pi, r_min: float = 2.0,
                       r_max: float = 40.0, n_disks: Optional[int] = None) -> np.ndarray:
    """Dead-leaves object: disks dropped one over another, radii with a 1/r³ density.

    Each disk has its own amplitude (0.6–1.0) and phase (±``max_phase``); later
    disks cover earlier ones. Edges are anti-aliased over one pixel so the
    object is band-limited enough to sample.
    """
    rng = np.random.default_rng(seed)
    n_disks = n_disks or int(4 * size * size / (np.pi * r_min * r_max))
    u = rng.uniform(size=n_disks)
    radii = 1.0 / np.sqrt(u / r_min**2 + (1 - u) / r_max**2)  # inverse CDF of density ∝ r⁻³ on [r_min, r_max]
    cx = rng.uniform(-r_max, size + r_max, n_disks)
    cy = rng.uniform(-r_max, size + r_max, n_disks)
    amp_v = rng.uniform(0.6, 1.0, n_disks)
    ph_v = rng.uniform(-max_phase, max_phase, n_disks)
    amp = np.full((size, size), 0.9)
    phase = np.zeros((size, size))
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    for i in np.argsort(-radii):  # large leaves first, small ones fall on top
        r = radii[i]
        x0, x1 = max(int(cx[i] - r - 1), 0), min(int(cx[i] + r + 2), size)
        y0, y1 = max(int(cy[i] - r - 1), 0), min(int(cy[i] + r + 2), size)
        if x0 >= x1 or y0 >= y1:
            continue
        d = np.hypot(xx[y0:y1, x0:x1] - cx[i], yy[y0:y1, x0:x1] - cy[i])
        cover = np.clip(r + 0.5 - d, 0.0, 1.0)
        amp[y0:y1, x0:x1] += cover * (amp_v[i] - amp[y0:y1, x0:x1])
        phase[y0:y1, x0:x1] += cover * (ph_v[i] - phase[y0:y1, x0:x1])
    return (amp * np.exp(1j * phase)).astype(np.complex64)


def realistic_scan(N: int = 64, n_positions: int = 1000, overlap: float = 0.7, photons: float = 1e6,
                   seed: int = 0, probe: Optional[np.ndarray] = None) -> PtychoData:
    """A zone-plate, Fermat-spiral, dead-leaves scan with Poisson noise at ``photons`` per frame.

    Returns ``PtychoData`` in the package's normalised units (``diffraction``
    = sqrt(counts)/s with s = sqrt(photons)/(N/2), probe with Σ|P|² = (N/2)²)
    plus the truth in ``object``; ``nphotons`` is the mean count per frame.
    ``save_realistic_npz`` writes it the way instruments do.
    """
    probe = zone_plate_probe(N) if probe is None else np.asarray(probe, np.complex64)
    step = (1.0 - overlap) * probe_diameter(probe)
    radius = step / np.sqrt(np.pi) * np.sqrt(n_positions) * 1.05
    size = int(np.ceil(2 * radius + N + 8))
    obj_seed, noise_seed = np.random.SeedSequence(seed).spawn(2)
    obj = dead_leaves_object(size, int(obj_seed.generate_state(1)[0]))
    x, y = fermat_spiral(n_positions, step, ((size - 1) / 2, (size - 1) / 2))
    patches = extract_patches(obj, x, y, N)
    s = np.sqrt(photons) / (N / 2)
    # Σ|P|² = (N/2)² and |O| ≲ 1: a frame holds ≈ photons · mean|O|² counts.
    expected = (far_field_amplitude(patches, probe).astype(np.float64) * s) ** 2
    counts = np.random.default_rng(noise_seed).poisson(expected)
    return PtychoData(diffraction=(np.sqrt(counts) / s).astype(np.float32), xcoords=x, ycoords=y, probe=probe,
                      object=obj, patches=patches, scan_index=np.zeros(x.size, np.int64),
                      nphotons=float(np.mean(counts.sum(axis=(1, 2)))))


def save_realistic_npz(path, data: PtychoData) -> None:
    """Write ``data`` as an instrument would: sqrt(counts) in photons, probe at an arbitrary absolute scale."""
    from ptycho_runtime.files.npz import write_npz_arrays

    if data.nphotons is None:
        raise ValueError("the scan has no photon count (nphotons); it cannot be written in photon units")
    amp = data.diffraction.astype(np.float64)
    s = np.sqrt(data.nphotons / np.mean(np.sum(amp**2, axis=(1, 2))))  # normalised → photon units
    probe = data.probe * np.sqrt(PROBE_FILE_ENERGY / np.sum(np.abs(data.probe.astype(np.complex128)) ** 2))
    write_npz_arrays(path, {
        "diffraction": np.sqrt(np.round((amp * s) ** 2)).astype(np.float32),
        "probeGuess": probe.astype(np.complex64),
        "xcoords": data.xcoords, "ycoords": data.ycoords,
        "objectGuess": data.object.astype(np.complex64),
    })


TRAIN_SEED, TEST_SEED = 1, 2  # the benchmark's training scan and its held-out scan (a different object)


def write_benchmark_scans(folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write the benchmark's ``train.npz`` (seed 1) and held-out ``test.npz`` (seed 2) into ``folder``.

    The scans every fidelity figure in docs/fidelity.md, the demo and the
    shipped bundle (``models/``) are measured on.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "train.npz", out / "test.npz")
    for path, seed in zip(paths, (TRAIN_SEED, TEST_SEED), strict=True):
        save_realistic_npz(path, realistic_scan(seed=seed))
    return paths


if __name__ == "__main__":  # python -m ptycho_export.data.realistic FOLDER
    import sys

    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m ptycho_export.data.realistic FOLDER  (writes FOLDER/train.npz, FOLDER/test.npz)")
    for written in write_benchmark_scans(sys.argv[1]):
        print(f"wrote {written}")
