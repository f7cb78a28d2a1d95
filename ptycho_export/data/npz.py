"""Read and write the PtychoPINN NPZ data contract as ``PtychoData``.

The contract itself (keys, shapes, validation, error messages, counts
normalisation, atomic writing) is defined once, in ``ptycho_runtime.npz``,
so that training and the lightweight runtime accept exactly the same files.
This module only turns those arrays into a ``PtychoData`` and back.

Keys (one PtychoData field each):

    diffraction  (n, N, N) float32 amplitude or counts (legacy name: diff3d)
    probeGuess   (N, N)    complex
    xcoords, ycoords (n,)  float, frame centres (pixel (N−1)/2) in object pixels
    objectGuess  (M, M')   complex   optional → PtychoData.object
    Y            (n, N, N) complex   optional → PtychoData.patches
    scan_index   (n,)      int       optional
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Union

import numpy as np

from ptycho_runtime.files.npz import read_npz_arrays, write_npz_arrays
from ptycho_runtime.reconstruction.geometry import DEFAULT_CENTRE

from .container import PtychoData

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["load_npz", "load_ptychodus", "save_npz"]


def load_npz(path: PathLike, counts: Optional[bool] = None, units: str = "auto",
             position_centre: str = DEFAULT_CENTRE) -> PtychoData:
    """Load a PtychoPINN-style NPZ into a validated ``PtychoData``.

    Reading and validation (keys, shapes, units of the diffraction, probe
    scale, frame-centre convention, the errors) are
    ``ptycho_runtime.npz.read_npz_arrays``: one definition for training and
    the runtime. ``nphotons`` is filled in when the file holds counts or
    photon-unit amplitudes.
    """
    arrays = read_npz_arrays(path, counts=counts, units=units, position_centre=position_centre, _stacklevel=3)
    return PtychoData(
        diffraction=arrays["diffraction"],
        xcoords=arrays["xcoords"],
        ycoords=arrays["ycoords"],
        probe=arrays["probeGuess"],
        object=arrays.get("objectGuess"),
        patches=arrays.get("Y"),
        scan_index=arrays.get("scan_index"),
        nphotons=arrays["nphotons"],
    )


def load_ptychodus(product: PathLike, patterns: PathLike) -> PtychoData:
    """Load a ptychodus product file + diffraction file (counts) into a ``PtychoData``, with its physics.

    ptychodus's own readers and geometry do the work
    (``ptycho_runtime.ptychodus.files``; needs ``pip install
    'ptycho-runtime[ptychodus]'``); the counts are normalised as an NPZ of
    counts would be (``normalization_factor``, ``normalise_probe``), and the
    product's photon energy, detector distance and object pixel size become
    the data's ``physics``.
    """
    try:
        from ptycho_runtime.hosts.ptychodus.files import read_input, training_scan
    except ImportError as exc:
        raise ValueError(f"reading ptychodus files needs ptychodus: pip install 'ptycho-runtime[ptychodus]' ({exc})"
                         ) from None
    from ptycho_runtime.files.npz import normalise_probe, normalization_factor

    scan = training_scan(read_input(product, patterns))
    amp = scan["diffraction"]
    factor = normalization_factor(amp)
    probe, _ = normalise_probe(scan["probeGuess"], amp, factor)
    host = scan["physics"]
    physics = {"photon_energy_eV": host.photon_energy_eV, "detector_distance_m": host.detector_distance_m,
               "object_pixel_size_m": host.object_pixel_size_m}
    return PtychoData(diffraction=(amp * factor).astype(np.float32), xcoords=scan["xcoords"],
                      ycoords=scan["ycoords"], probe=probe, object=scan["objectGuess"],
                      nphotons=float(np.mean(np.sum(amp.reshape(amp.shape[0], -1).astype(np.float64) ** 2, axis=-1))),
                      physics=physics)


def save_npz(path: PathLike, data: PtychoData) -> None:
    """Write ``data`` as a compressed PtychoPINN NPZ, atomically.

    The arrays go to a temporary file in the destination folder, which is
    flushed and then renamed over ``path`` with ``os.replace``: a crash or a
    full disk never leaves a half-written file under the final name.  The
    name is used exactly as given (numpy's automatic ".npz" suffix does not
    apply).
    """
    if not isinstance(data, PtychoData):
        raise TypeError(f"save_npz expects a PtychoData (got {type(data).__name__})")
    arrays: Dict[str, np.ndarray] = {
        "diffraction": data.diffraction.astype(np.float32, copy=False),
        "probeGuess": data.probe.astype(np.complex64, copy=False),
        "xcoords": data.xcoords.astype(np.float64, copy=False),
        "ycoords": data.ycoords.astype(np.float64, copy=False),
    }
    if data.object is not None:
        arrays["objectGuess"] = data.object.astype(np.complex64, copy=False)
    if data.patches is not None:
        arrays["Y"] = data.patches.astype(np.complex64, copy=False)
    if data.scan_index is not None:
        arrays["scan_index"] = data.scan_index.astype(np.int64, copy=False)
    write_npz_arrays(path, arrays)
