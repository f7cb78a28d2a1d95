"""Scans made by simulators that are not the project's own, written as instruments write them.

Issue 17 asks that every refinement or network change be judged on data the
project's simulator (``ptycho_export.data.realistic``) did not make: a network
trained on one forward model can learn that model's quirks. Each function here
builds one scan with another code's forward model and returns the arrays of a
PtychoPINN NPZ (docs/data.md): ``diffraction`` = sqrt(counts) in photon units,
``probeGuess`` at the simulator's own absolute scale, positions naming frame
pixel (N−1)/2, the truth in ``objectGuess``.

- ``ptychodus_scan``: ptychodus 1.7's own builders and forward model
  (``ptychodus.api.simulate``): a Fresnel zone plate of real dimensions
  (10 keV, 2 m, 75 µm detector pixels) defocused 0.8 mm, ptychodus's spiral
  scan, a multi-octave simplex-noise ("fractal") object, and
  ``generate_diffraction_data`` (integer patch + Fourier-shifted probe,
  Fresnel-transform propagator with its input chirp, Poisson noise).
- ``ptychi_scan``: pty-chi's forward model (``PlanarPtychographyForwardModel``
  run on the true object), a probe unlike any zone plate (square, astigmatic
  KB-like focus), a jittered raster scan and natural-image texture
  (scikit-image photographs, ``coins`` and ``camera`` at seed 0) over a slow
  phase bump.

Neither object family (fractal noise, photographs) nor either probe is what the
shipped bundle was trained on (dead leaves, the project's zone plate).

``forward_check`` reads a written file back with ``ptycho_export.data.load_npz``
and applies the project's far-field model to the true object: the patterns must
come back within Poisson noise, and half a pixel of position slip must show.

Run (each generator in the interpreter that has its simulator; ptychodus's
venv has no torch, pty-chi's needs it)::

    .venv-ptychodus/bin/python -m benchmarks.independent_scans OUT --simulator ptychodus
    .venv/bin/python -m benchmarks.independent_scans OUT --simulator ptychi
    .venv/bin/python -m benchmarks.independent_scans OUT --check-only   # forward check of OUT/*.npz

Everything is deterministic by ``seed``. The simulators are imported lazily, so
this module imports with numpy alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

PHOTONS = 1e6          # mean counts per frame, as on a bright beamline
N_FRAME = 64
N_POSITIONS = 1000
OVERLAP = 0.7          # linear overlap of neighbours, as (1 − step / probe diameter)
ENERGY_EV = 10_000.0
DETECTOR_DISTANCE_M = 2.0
DETECTOR_PIXEL_M = 75e-6
SIMULATORS = ("ptychodus", "ptychi")


def probe_diameter(probe: np.ndarray, fraction: float = 0.9) -> float:
    """Diameter (pixels) of the disk about the probe's centroid holding ``fraction`` of its intensity.

    The same definition as ``ptycho_export.data.realistic.probe_diameter``, so
    "70% overlap" means the same thing in every scan.
    """
    from ptycho_export.data.realistic import probe_diameter as diameter

    return diameter(probe, fraction)


def scale_to_photons(expected_sum: np.ndarray, photons: float) -> float:
    """Factor on intensity that brings the mean noiseless count per frame to ``photons``."""
    return float(photons / np.mean(expected_sum))


def npz_arrays(counts: np.ndarray, probe: np.ndarray, x: np.ndarray, y: np.ndarray, obj: np.ndarray) -> dict:
    """The arrays of a PtychoPINN NPZ as an instrument writes it: sqrt(counts) in photon units."""
    counts = np.asarray(counts)
    if np.any(counts < 0) or np.any(counts != np.round(counts)):
        raise ValueError("counts must be whole non-negative numbers")
    return {
        "diffraction": np.sqrt(counts).astype(np.float32),
        "probeGuess": np.asarray(probe, np.complex64),
        "xcoords": np.asarray(x, np.float64),
        "ycoords": np.asarray(y, np.float64),
        "objectGuess": np.asarray(obj, np.complex64),
        "scan_index": np.zeros(len(x), np.int64),
    }


# ----------------------------------------------------------------------------
# ptychodus
# ----------------------------------------------------------------------------


def _ptychodus_object(geometry: Any, rng: np.random.Generator) -> Any:
    """A multi-octave simplex-noise object from ptychodus's generator: amplitude 0.55–1, phase ±1.2 rad."""
    from ptychodus.api.object import Object
    from ptychodus.api.simulate.object import generate_fractal_noise_object

    noise = generate_fractal_noise_object(rng, geometry, grid_scale_px=64.0, num_octaves=5).get_array()[0]
    # ptychodus's noise is re + i·im, each part a sum of octaves in about ±1; one part sets each channel.
    re, im = noise.real, noise.imag
    amp = 0.55 + 0.45 * (re - re.min()) / (re.max() - re.min())
    phase = 1.2 * (2 * (im - im.min()) / (im.max() - im.min()) - 1)
    return Object(array=(amp * np.exp(1j * phase)).astype(complex), pixel_geometry=geometry.get_pixel_geometry(),
                  center=geometry.get_center())


def ptychodus_scan(seed: int = 0, n_positions: int = N_POSITIONS, photons: float = PHOTONS,
                   N: int = N_FRAME, overlap: float = OVERLAP, defocus_m: float = 0.8e-3,
                   product_folder: Optional[Path] = None) -> dict:
    """A scan from ptychodus 1.7's simulator: zone plate, spiral, fractal object, its diffraction model.

    The probe is ptychodus's Fresnel zone plate (160 µm, 90 nm outer zone,
    60 µm stop; f = 116 mm) 0.8 mm out of focus: a ring-shaped spot of ≈24 px
    with a Poisson spot at its centre, against the training zone plate's
    ≈32 px (complex overlap 0.09). The outer zone sets the bright-field disk's
    radius on the detector, N·dx/(2·Δr) = 18 px of 32, so the pupil is not
    clipped by the frame. Its absolute scale is ptychodus's (counts
    = |A·FFT(ψ·B)|² with A ∝ the pixel Fresnel number), set with
    ``rescale_probe_intensity`` so a frame holds ≈ ``photons`` counts; the NPZ
    keeps it at that scale. With ``product_folder`` ptychodus's own
    ``product.h5`` and ``diffraction.h5`` are written there too, and the NPZ
    that ptychodus's ``save_ptychopinn_training_data`` makes of them.
    """
    from ptychodus.api.constants import energy_eV_to_wavelength_m
    from ptychodus.api.geometry import ImageExtent, PixelGeometry
    from ptychodus.api.object import ObjectGeometry
    from ptychodus.api.probe import ProbeGeometry, ProbeSequence
    from ptychodus.api.probe_positions import ProbePositionSequence
    from ptychodus.api.product import Product, ProductMetadata
    from ptychodus.api.simulate.diffraction import generate_diffraction_data
    from ptychodus.api.simulate.probe import (
        FresnelZonePlate,
        generate_fresnel_zone_plate_probe,
        rescale_probe_intensity,
    )
    from ptychodus.api.simulate.probe_positions import generate_spiral_probe_positions

    object_seed, noise_seed = np.random.SeedSequence(seed).spawn(2)
    wavelength_m = energy_eV_to_wavelength_m(ENERGY_EV)
    geometry = ProbeGeometry.from_far_field(PixelGeometry(DETECTOR_PIXEL_M, DETECTOR_PIXEL_M), ImageExtent(N, N),
                                            wavelength_m=wavelength_m, distance_m=DETECTOR_DISTANCE_M)
    zone_plate = FresnelZonePlate(zone_plate_diameter_m=160e-6, outermost_zone_width_m=90e-9,
                                  central_beamstop_diameter_m=60e-6)
    probe = generate_fresnel_zone_plate_probe(geometry, zone_plate, photon_wavelength_m=wavelength_m,
                                              defocus_distance_m=defocus_m)
    probe = rescale_probe_intensity(probe, 1.0)
    dx = geometry.pixel_width_m
    step_px = (1.0 - overlap) * probe_diameter(probe.get_array()[0])
    # ptychodus's spiral has r = c·sqrt(k): one point per π c², so c = 1.05·step/sqrt(π) gives the spacing
    spiral = list(generate_spiral_probe_positions(n_positions, 1.05 * step_px * dx / np.sqrt(np.pi)))
    positions = ProbePositionSequence(spiral)
    radius_px = 1.05 * step_px / np.sqrt(np.pi) * np.sqrt(n_positions)
    size = int(np.ceil(2 * radius_px + N + 8))
    object_geometry = ObjectGeometry(width_px=size, height_px=size, pixel_width_m=dx, pixel_height_m=dx,
                                     center_x_m=0.0, center_y_m=0.0)
    obj = _ptychodus_object(object_geometry, np.random.default_rng(object_seed))

    def product_with(probe_now: Any) -> Product:
        metadata = ProductMetadata(name="independent-ptychodus", comments=f"ptycho-export benchmark, seed {seed}",
                                   detector_distance_m=DETECTOR_DISTANCE_M, photon_energy_eV=ENERGY_EV,
                                   probe_photon_count=photons, exposure_time_s=1.0,
                                   mass_attenuation_m2_per_kg=0.0, tomography_angle_deg=0.0)
        probes = ProbeSequence(probe_now.get_array(), None, probe_now.get_pixel_geometry())
        return Product(metadata=metadata, probe_positions=positions, probes=probes, object_=obj, losses=[])

    noiseless = generate_diffraction_data(product_with(probe))
    gain = scale_to_photons(noiseless.get_patterns().sum(axis=(1, 2)), photons)
    probe = rescale_probe_intensity(probe, gain)  # Σ|P|² was 1
    product = product_with(probe)
    data = generate_diffraction_data(product, np.random.default_rng(noise_seed))
    if product_folder is not None:
        from ptychodus.api.io import save_diffraction_data, save_product, save_ptychopinn_training_data
        from ptychodus.api.reconstruct import ReconstructInput

        folder = Path(product_folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_product(folder / "product.h5", product)
        save_diffraction_data(folder / "diffraction.h5", data)
        # what ptychodus's own PtychoPINN reconstructors write for training: counts in diff3d, a (modes, N, N) probe
        save_ptychopinn_training_data(folder / "ptychopinn_training_data.npz",
                                      ReconstructInput(data.get_patterns(), data.get_bad_pixels(), product))
    order = np.argsort(data.get_indexes())  # patterns follow the positions' indexes
    x = object_geometry.map_probe_positions_to_object_x_px(positions)
    y = object_geometry.map_probe_positions_to_object_y_px(positions)
    return npz_arrays(data.get_patterns()[order], probe.get_array()[0], x, y, obj.get_layer(0))


# ----------------------------------------------------------------------------
# pty-chi
# ----------------------------------------------------------------------------


def kb_probe(N: int = N_FRAME, half_width: float = 10.0, defocus: float = 10.0, astigmatism: float = 4.0,
             coma: float = 1.5, taper: float = 3.0) -> np.ndarray:
    """A Kirkpatrick–Baez-like probe: square pupil, defocus, astigmatism and coma; Σ|P|² = 1.

    Nothing like a zone plate: square, not annular; its focus is a cross-shaped
    spot, longer in one direction (astigmatism) and lopsided (coma), ≈27 px
    across at the defaults. The aberrations are radians at the pupil's edge.
    The pupil's edges fall linearly over ``taper`` Fourier pixels (mirror
    edges are not sharp), which keeps the sinc side lobes, and so the probe's
    energy at the frame's edge, small (0.03% within 3 px): a Fourier-shifted
    probe then barely wraps round.
    """
    f = np.fft.fftfreq(N) * N
    fy, fx = f[:, None], f[None, :]

    def edge(v: np.ndarray) -> np.ndarray:
        return np.clip((half_width + taper / 2 - np.abs(v)) / taper, 0.0, 1.0)

    u, v = fx / half_width, fy / half_width
    phase = defocus * (u**2 + v**2) / 2 + astigmatism * (u**2 - v**2) / 2 + coma * u * (u**2 + v**2) / 2
    probe = np.fft.fftshift(np.fft.ifft2(edge(fx) * edge(fy) * np.exp(1j * phase)))
    return (probe / np.sqrt(np.sum(np.abs(probe) ** 2))).astype(np.complex64)


# (amplitude, phase) photographs bundled with scikit-image; a scan's seed picks the pair, so seed 0 and seed 1
# share no image and one can be trained on and the other held out
PHOTO_PAIRS = (("coins", "camera"), ("brick", "clock"), ("cell", "moon"), ("gravel", "page"))


def photo_object(size: int, seed: int, pair: tuple[str, str] = PHOTO_PAIRS[0]) -> np.ndarray:
    """Natural-image texture: one photograph as amplitude (0.5–1), another plus a slow bump as phase (±1.3 rad).

    A random crop of each photograph (by ``seed``), resized to ``size``; the
    phase adds a smooth bump the width of the field (a thickness variation),
    the slowly varying phase a network reads worst. ``pair`` names the
    scikit-image pictures (default ``coins`` and ``camera``).
    """
    from skimage import data as images
    from skimage.transform import resize

    rng = np.random.default_rng(seed)

    def crop(img: np.ndarray) -> np.ndarray:
        img = np.asarray(img, np.float64)
        side = int(0.8 * min(img.shape))
        r0, c0 = rng.integers(0, img.shape[0] - side + 1), rng.integers(0, img.shape[1] - side + 1)
        out = resize(img[r0:r0 + side, c0:c0 + side], (size, size), order=3, anti_aliasing=True)
        return (out - out.min()) / (out.max() - out.min())

    amp = 0.5 + 0.5 * crop(getattr(images, pair[0])())
    yy, xx = (np.mgrid[:size, :size] - (size - 1) / 2) / size
    bump = np.exp(-((xx - 0.1) ** 2 + (yy + 0.05) ** 2) / (2 * 0.25**2))
    phase = 0.8 * (2 * crop(getattr(images, pair[1])()) - 1) + 1.0 * (bump - bump.mean())
    phase = 1.3 * phase / np.max(np.abs(phase))
    return (amp * np.exp(1j * phase)).astype(np.complex64)


def jittered_raster(n_positions: int, step: float, jitter: float, rng: np.random.Generator,
                    centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """A square raster of ≈``n_positions`` points ``step`` apart, each moved uniformly within ±``jitter``·step."""
    side = int(np.round(np.sqrt(n_positions)))
    g = (np.arange(side) - (side - 1) / 2) * step
    gx, gy = np.meshgrid(g, g)
    x = centre[0] + gx.ravel() + rng.uniform(-jitter, jitter, gx.size) * step
    y = centre[1] + gy.ravel() + rng.uniform(-jitter, jitter, gy.size) * step
    return x, y


def ptychi_forward_intensity(obj: np.ndarray, probe: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Noiseless far-field intensities of ``probe·obj`` at (x, y) by pty-chi's own forward model, DC at N//2.

    pty-chi extracts each patch at the rounded position and Fourier-shifts the
    probe by the rest, then takes |fft2|² (unnormalised FFT, DC at [0, 0]).
    Positions are handed over as in ``ptycho_export.reference`` (origin 0.5,
    positions − 0.5: pty-chi's centre is frame pixel (N−1)/2 like ours, and
    this avoids its half-pixel rounding tie for even N).
    """
    import warnings

    import torch

    from ptycho_export.reference import import_ptychi

    api, PtychographyTask, _ = import_ptychi()
    n, N = len(x), probe.shape[-1]
    opts = api.EPIEOptions()
    opts.object_options.determine_position_origin_coords_by = api.ObjectPosOriginCoordsMethods.SPECIFIED
    opts.object_options.position_origin_coords = (0.5, 0.5)
    opts.reconstructor_options.default_device = api.Devices.CPU
    dtype, device = torch.get_default_dtype(), torch.get_default_device()  # a pty-chi task changes both
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Converting a tensor with requires_grad=True to a scalar")
            task = PtychographyTask(opts, diffraction_data=np.ones((n, N, N), np.float32),
                                    object_data=obj.astype(np.complex64)[None],
                                    probe_data=probe.astype(np.complex64)[None, None],
                                    probe_position_x_px=(np.asarray(x) - 0.5).astype(np.float32),
                                    probe_position_y_px=(np.asarray(y) - 0.5).astype(np.float32))
        model = task.reconstructor.forward_model
        with torch.no_grad():
            out = [model.forward(torch.arange(s, min(s + 128, n))).detach().cpu().numpy() for s in range(0, n, 128)]
        del task
    finally:
        torch.set_default_dtype(dtype)
        torch.set_default_device(device)
    return np.fft.fftshift(np.concatenate(out).astype(np.float64), axes=(-2, -1))


def ptychi_scan(seed: int = 0, n_positions: int = N_POSITIONS, photons: float = PHOTONS, N: int = N_FRAME,
                overlap: float = OVERLAP) -> dict:
    """A scan from pty-chi's forward model: KB-like probe, jittered raster, photographs as the object.

    The photographs are ``PHOTO_PAIRS[seed % 4]``: seeds 0 and 1 share none.

    The probe's absolute scale is the one that gives ≈ ``photons`` counts per
    frame through pty-chi's unnormalised FFT (Σ|P|² ≈ photons / N² / ⟨|O|²⟩).
    """
    object_seed, scan_seed, noise_seed = np.random.SeedSequence(seed).spawn(3)
    probe = kb_probe(N)
    step = (1.0 - overlap) * probe_diameter(probe)
    side = int(np.round(np.sqrt(n_positions)))
    size = int(np.ceil((side - 1) * step * 1.25 + N + 8))
    centre = ((size - 1) / 2, (size - 1) / 2)
    x, y = jittered_raster(n_positions, step, 0.15, np.random.default_rng(scan_seed), centre)
    obj = photo_object(size, int(object_seed.generate_state(1)[0]), PHOTO_PAIRS[seed % len(PHOTO_PAIRS)])
    expected = ptychi_forward_intensity(obj, probe, x, y)
    gain = scale_to_photons(expected.sum(axis=(1, 2)), photons)
    probe = (probe * np.sqrt(gain)).astype(np.complex64)
    counts = np.random.default_rng(noise_seed).poisson(expected * gain)
    return npz_arrays(counts, probe, x, y, obj)


# ----------------------------------------------------------------------------
# checks and the command line
# ----------------------------------------------------------------------------


def fourier_shift_patterns(obj: np.ndarray, probe: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|fftshift(fft2(P_shifted · O_patch))|² / N²: the project's far field with a Fourier-shifted probe.

    The same far-field model, centre convention and units as the project's
    ``far_field_amplitude(extract_patches(...))``, with the sub-pixel part of
    each position applied as a Fourier shift of the probe over the patch at
    the integer corner instead of a bilinear read of the object, to tell the
    interpolation's share of a misfit from the conventions'.
    """
    N = probe.shape[-1]
    fy, fx = np.fft.fftfreq(N)[:, None], np.fft.fftfreq(N)[None, :]
    spectrum = np.fft.fft2(probe)
    out = np.empty((len(x), N, N))
    for i, (cx, cy) in enumerate(zip(x, y, strict=True)):
        c0, r0 = int(np.floor(cx - (N - 1) / 2)), int(np.floor(cy - (N - 1) / 2))
        ddx, ddy = cx - (N - 1) / 2 - c0, cy - (N - 1) / 2 - r0
        shifted = np.fft.ifft2(spectrum * np.exp(-2j * np.pi * (fx * ddx + fy * ddy)))
        out[i] = np.abs(np.fft.fftshift(np.fft.fft2(shifted * obj[r0:r0 + N, c0:c0 + N]))) ** 2 / N**2
    return out


def _fit(measured: np.ndarray, model: np.ndarray) -> dict:
    """One-scale fit of ``model`` to ``measured`` counts: the scale, χ² per pixel, relative errors."""
    k = measured.sum() / model.sum()
    m = k * model
    lit = m >= 1.0  # E[(c − m)²] = m for Poisson counts: χ² is 1 on every pixel that has a count to expect
    return {"scale": float(k), "chi2": float(np.mean((measured[lit] - m[lit]) ** 2 / m[lit])),
            "rel_intensity_error": float(np.linalg.norm(measured - m) / np.linalg.norm(m)),
            "rel_poisson": float(np.sqrt(m.sum()) / np.linalg.norm(m))}


def forward_check(path: Path, slip: float = 0.5) -> dict:
    """Read ``path`` as a user would and test it against the project's far-field model on the true object.

    ``load_npz`` normalises the file (docs/data.md); the model is the
    project's ``far_field_amplitude(extract_patches(objectGuess, x, y, N),
    probe)`` (bilinear object read), and the same far field with a
    Fourier-shifted probe (``fourier_shift_patterns``), in counts via
    s = sqrt(nphotons)/(N/2). For each model, after fitting one scale:
    ``chi2`` = mean over pixels expecting ≥ 1 count of (measured − model)² /
    model (1 for pure Poisson noise), ``rel_intensity_error`` = ‖measured − model‖ / ‖model‖
    against ``rel_poisson``, what noise alone gives; ``*_slip``: the same with
    every position moved by ``slip`` px in x and y; ``*_integer``: only the
    frames within 0.1 px of whole-pixel positions, where interpolation cannot
    matter. ``count_ratio`` = Σ measured / Σ model with the probe as the
    reader scaled it: 1 when the reader's probe-scale rule holds for this
    object (the brightest frames taken as transmission 1); above 1 the
    reader's probe is too dim, and any reconstruction's amplitude comes out
    ``amplitude_scale`` = sqrt(count_ratio) times the truth.
    """
    from ptycho_export.data import extract_patches, far_field_amplitude, load_npz

    data = load_npz(path)
    N = data.diffraction.shape[-1]
    s2 = data.nphotons / (N / 2) ** 2
    measured = data.diffraction.astype(np.float64) ** 2 * s2
    x, y = data.xcoords, data.ycoords
    frac = np.maximum(np.abs(x - (N - 1) / 2 - np.round(x - (N - 1) / 2)),
                      np.abs(y - (N - 1) / 2 - np.round(y - (N - 1) / 2)))
    whole = frac < 0.1
    models = {
        "bilinear": lambda d: far_field_amplitude(extract_patches(data.object, x + d, y + d, N),
                                                  data.probe).astype(np.float64) ** 2 * s2,
        "fourier": lambda d: fourier_shift_patterns(data.object, data.probe, x + d, y + d) * s2,
    }
    report: dict = {"file": str(path), "frames": int(measured.shape[0]), "N": int(N),
                    "photons_per_frame": float(data.nphotons), "probe_diameter_px": probe_diameter(data.probe),
                    "slip_px": slip, "integer_frames": int(whole.sum())}
    for name, model_at in models.items():
        model, slipped = model_at(0.0), model_at(slip)
        fit = _fit(measured, model)
        report[name] = {**fit, "count_ratio": fit["scale"], "amplitude_scale": float(np.sqrt(fit["scale"])),
                        "chi2_slip": _fit(measured, slipped)["chi2"]}
        if whole.sum() >= 5:
            report[name]["chi2_integer"] = _fit(measured[whole], model[whole])["chi2"]
            report[name]["chi2_integer_slip"] = _fit(measured[whole], slipped[whole])["chi2"]
    return report


def write_scan(out: Path, simulator: str, seed: int, n_positions: int, photons: float,
               product_folder: Optional[Path] = None, name: Optional[str] = None) -> Path:
    """Make one simulator's scan and write ``out/<name>.npz`` (default name: the simulator's) atomically."""
    from ptycho_runtime.files.npz import write_npz_arrays

    if simulator == "ptychodus":
        arrays = ptychodus_scan(seed, n_positions, photons, product_folder=product_folder)
    elif simulator == "ptychi":
        arrays = ptychi_scan(seed, n_positions, photons)
    else:
        raise ValueError(f"unknown simulator {simulator!r}; choose one of {', '.join(SIMULATORS)}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name or simulator}.npz"
    write_npz_arrays(path, arrays)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for <simulator>.npz (and <simulator>.check.json)")
    parser.add_argument("--simulator", choices=SIMULATORS, action="append",
                        help="which scan(s) to make (repeatable; default: none with --check-only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--positions", type=int, default=N_POSITIONS)
    parser.add_argument("--photons", type=float, default=PHOTONS)
    parser.add_argument("--product-folder", type=Path, default=None,
                        help="ptychodus only: also write ptychodus's product.h5 and diffraction.h5 there")
    parser.add_argument("--name", default=None,
                        help="file name without .npz (default: the simulator's; one --simulator only), e.g. "
                             "ptychodus-train with --seed 1 for a scan to train on")
    parser.add_argument("--check-only", action="store_true", help="forward-check the existing OUT/*.npz")
    args = parser.parse_args(argv)
    if args.name is not None and len(args.simulator or []) != 1:
        parser.error("--name needs exactly one --simulator")
    paths = [] if args.check_only else [
        write_scan(args.out, simulator, args.seed, args.positions, args.photons, args.product_folder, args.name)
        for simulator in (args.simulator or [])]
    if args.check_only:
        paths = sorted(args.out.glob("*.npz"))
    for path in paths:
        report = forward_check(path)
        path.with_suffix(".check.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
