"""ptychodus's data in and out of the runtime: its files, its ``ReconstructInput``, its ``Product``.

One mapping, used by the reconstructor inside ptychodus, by ``ptycho-runtime
infer --product --patterns`` and by ``ptycho-export train --product
--patterns``, so the three cannot disagree. ptychodus's own API does the
reading, writing and geometry (``load_product``, ``load_diffraction_data``,
``prepare_reconstruct_input``, ``save_product``,
``ObjectGeometry.map_probe_positions_to_object_x_px``): its files and its
conventions are whatever ptychodus 1.7 says they are, not our copy of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
from ptychodus.api.io import load_diffraction_data, load_product, save_product
from ptychodus.api.object import Object
from ptychodus.api.probe import ProbeSequence
from ptychodus.api.product import Product
from ptychodus.api.reconstruct import ReconstructInput, prepare_reconstruct_input

from ...format import atomic_write_path
from ...format.isolated import check_in_parser
from ...inference.compatibility import HostPhysics
from ...reconstruction.geometry import ObjectGrid
from ...reconstruction.stitching import Reconstruction

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class HostScan:
    """What the runtime needs from a ptychodus reconstruction input, as plain arrays.

    ``counts`` [n, H, W] detector counts; ``bad_pixels`` [H, W] (True = bad);
    ``positions_px`` [n, 2] (x, y) object pixels of ``grid``, converted by
    ptychodus's ``ObjectGeometry`` (frame pixel (N−1)/2, the runtime's
    default); ``grid`` the input object's shape, pixel size and centre;
    ``probe`` [H, W] the host's probe (first mode, no OPR); ``physics`` the
    instrument as the product describes it (probe included), for
    ``Bundle.check_host``.
    """

    counts: np.ndarray
    bad_pixels: np.ndarray
    positions_px: np.ndarray
    grid: ObjectGrid
    probe: np.ndarray
    physics: HostPhysics

    def reconstruct_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Bundle.reconstruct`` (and ``BundleWorker.run``) for this scan.

        ``probe`` is the product's own probe guess, the one refinement uses
        (with ``refine=``; without, it is not read).
        """
        return dict(counts=True, units="pixels", grid=self.grid, bad_pixels=self.bad_pixels, fill=1 + 0j,
                    host=self.physics, probe=self.probe)


def host_scan(parameters: ReconstructInput) -> HostScan:
    """A ptychodus ``ReconstructInput`` → ``HostScan`` (positions through ptychodus's own geometry)."""
    product = parameters.product
    geometry = product.object_.get_geometry()
    positions = product.probe_positions
    pos = np.stack([geometry.map_probe_positions_to_object_x_px(positions),
                    geometry.map_probe_positions_to_object_y_px(positions)], axis=1)
    grid = ObjectGrid((geometry.height_px, geometry.width_px), (geometry.pixel_width_m, geometry.pixel_height_m),
                      (geometry.center_x_m, geometry.center_y_m))
    probe = np.asarray(product.probes.get_probe_no_opr().get_array())
    probe = probe.reshape(-1, *probe.shape[-2:])[0]
    meta = product.metadata
    physics = HostPhysics(photon_energy_eV=meta.photon_energy_eV, detector_distance_m=meta.detector_distance_m,
                          object_pixel_size_m=geometry.pixel_width_m,
                          probe_pixel_size_m=product.probes.get_pixel_geometry().width_m, probe=probe)
    bad = parameters.bad_pixels
    bad = np.zeros(np.shape(parameters.diffraction_patterns)[-2:], bool) if bad is None else np.asarray(bad, bool)
    return HostScan(np.asarray(parameters.diffraction_patterns), bad, pos, grid, probe, physics)


def output_product(product: Product, reconstruction: Reconstruction) -> Product:
    """The input product with the reconstructed object: same grid, positions and metadata passed through.

    The object keeps the input's pixel size and centre (the reconstruction
    was made on that grid) and its dtype; it has one layer (the model is a
    thin-object model). Pixels no patch reached are whatever the
    reconstruction filled them with (1+0j from ``HostScan.reconstruct_kwargs``).

    The probe is the one the object goes with: after refinement
    (``reconstruction.probe`` set) the probe refinement used — the product's
    own, refined when probe refinement ran, at the scale of the measured
    amplitudes (``probe_scale.normalise_probe``), one mode, no OPR — else the
    input's probes, passed through.
    """
    obj_in = product.object_
    shape = obj_in.get_array().shape[-2:]
    if reconstruction.object.shape != shape:
        raise ValueError(f"the reconstruction is {reconstruction.object.shape}, not on the input object grid {shape}")
    dtype = obj_in.get_array().dtype if np.iscomplexobj(obj_in.get_array()) else np.complex64
    obj = Object(array=reconstruction.object.astype(dtype), pixel_geometry=obj_in.get_pixel_geometry(),
                 center=obj_in.get_center(), layer_spacing_m=[])
    probes = product.probes
    if reconstruction.probe is not None:
        given = probes.get_array()
        dtype = given.dtype if np.iscomplexobj(given) else np.complex64
        probes = ProbeSequence(np.asarray(reconstruction.probe).astype(dtype), None, probes.get_pixel_geometry())
    return Product(metadata=product.metadata, probe_positions=product.probe_positions, probes=probes,
                   object_=obj, losses=[])


def read_input(product_path: PathLike, patterns_path: PathLike) -> ReconstructInput:
    """A ptychodus product file and diffraction file → the ``ReconstructInput`` ptychodus itself would build.

    Patterns and positions are paired by scan index (``prepare_reconstruct_input``).
    ``FileNotFoundError`` or ``ValueError`` (naming the file) when a file is missing or not ptychodus's.
    The files come from strangers and ptychodus reads them with libhdf5, so
    the same read runs first in the parsing process (``format.isolated.check_in_parser``):
    a file that makes libhdf5 loop, crash or allocate past the memory there
    is a ``ValueError`` before this process reads it.
    """
    for label, path in (("product", product_path), ("diffraction", patterns_path)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no ptychodus {label} file at {path}")
    check_in_parser(f"{__name__}:read_input_in_process", [product_path, patterns_path])
    return read_input_in_process(product_path, patterns_path)


def read_input_in_process(product_path: PathLike, patterns_path: PathLike) -> ReconstructInput:
    """``read_input`` without the parsing process: what that process runs (and this one, once it finished)."""
    try:
        product = load_product(os.fspath(product_path))
    except (KeyError, OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{product_path} is not a ptychodus product file ({type(exc).__name__}: {exc}); write one "
                         "with ptychodus (File → Save product) or ptychodus.api.io.save_product") from None
    try:
        patterns = load_diffraction_data(os.fspath(patterns_path))
    except (KeyError, OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{patterns_path} is not a ptychodus diffraction file ({type(exc).__name__}: {exc}); write "
                         "one with ptychodus.api.io.save_diffraction_data") from None
    return prepare_reconstruct_input(patterns, product)


def write_product(path: PathLike, product: Product) -> None:
    """``save_product``, atomically: the file at ``path`` is either the old one or the complete new one."""
    with atomic_write_path(path) as tmp:
        save_product(tmp, product)


def training_scan(parameters: ReconstructInput, nphotons: Optional[float] = None) -> dict[str, Any]:
    """A ptychodus input as the arrays ``ptycho_export`` trains from (the PtychoPINN NPZ keys, photon units).

    ``diffraction`` is sqrt(counts) with bad pixels repaired (photon-unit
    amplitude); positions in object pixels of the input grid; the object and
    probe of the product as ``objectGuess``/``probeGuess``; ``physics`` the
    instrument, for the bundle; ``nphotons`` the mean photon count per
    pattern, as ``read_npz_arrays`` reports it for counts: measured from the
    counts, or the ``nphotons`` given (a dose the host knows better, e.g.
    from its flux monitor; a finite number > 0).
    """
    from ...reconstruction.inputs import repair_bad_pixels

    if nphotons is not None and not (isinstance(nphotons, (int, float)) and np.isfinite(nphotons) and nphotons > 0):
        raise ValueError(f"nphotons must be a finite number > 0 photons per pattern (got {nphotons!r})")
    scan = host_scan(parameters)
    amplitude = np.sqrt(np.maximum(scan.counts.astype(np.float32), 0))
    repair_bad_pixels(amplitude, scan.bad_pixels)
    if nphotons is None:
        flat = amplitude.reshape(amplitude.shape[0], -1).astype(np.float64)
        nphotons = float(np.mean(np.sum(flat**2, axis=-1)))
    return {"diffraction": amplitude, "xcoords": scan.positions_px[:, 0], "ycoords": scan.positions_px[:, 1],
            "probeGuess": scan.probe.astype(np.complex64),
            "objectGuess": parameters.product.object_.get_layer(0).astype(np.complex64),
            "physics": scan.physics, "nphotons": float(nphotons)}
