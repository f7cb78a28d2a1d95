"""The reconstruction file (HDF5) that ``ptycho-runtime infer`` and ``infer-many`` write.

Why a module of its own: the file is a format other programs read, written
from two places (one machine, and the driver of a Dask run that never holds a
``Bundle``). What the writer records about the model is a ``Provenance``, so
both hand it the same plain facts: ``Provenance.of(bundle)`` on one machine,
the workers' report on a cluster.

Layout: ``object`` (complex64), ``amplitude``, ``phase``, ``weight``,
``x_coords``, ``y_coords``, ``positions`` [n, 2]; ``probe`` (the one the
object goes with; attribute ``source``) and the bundle's array params under
``params/``; root attributes: ``format`` (``RECONSTRUCTION_FORMAT``),
producer, params_json, bundle and scan paths, backend, device, providers,
patterns_per_second, elapsed_s, n_patterns, N, gridsize, intensity_scale,
probe_source, refined, refinement_json (when refined), notes_json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .._version import __version__
from ..format import atomic_h5_write, split_params
from ..reconstruction.stitching import Reconstruction

RECONSTRUCTION_FORMAT = "ptycho-runtime-reconstruction"


@dataclass(frozen=True)
class Provenance:
    """What made a reconstruction: the bundle (path, params) and where its graph ran."""

    bundle_path: str
    params: Mapping[str, Any]
    backend: str
    device: str
    providers: Sequence[str]

    @classmethod
    def of(cls, bundle: Any) -> "Provenance":
        """The provenance of a loaded ``Bundle`` (anything with ``path``, ``params``, ``backend``, ``device``,
        ``providers``)."""
        return cls(str(bundle.path), bundle.params, str(bundle.backend), str(bundle.device), list(bundle.providers))


def write_reconstruction(path: str | os.PathLike, recon: Reconstruction, positions: np.ndarray,
                         provenance: Provenance, patterns_per_second: float, elapsed_s: float,
                         scan_path: str | os.PathLike, notes: Mapping[str, Any] | None = None) -> None:
    """The reconstruction as HDF5, written to a temporary file and renamed into place.

    ``probe`` is the probe the object goes with, and its ``source`` attribute
    (also the root's ``probe_source``) says whose: after refinement the probe
    refinement used (the scan's, possibly refined); otherwise the bundle's
    training probe, the only one the network's object is tied to. The bundle's
    probe is always also under ``params/probe``. A refined object's record
    (engine, backend, sweeps, batching, start, probe updated or not, misfit
    per sweep) is ``refinement_json``; ``notes`` (plain data, e.g. how the
    reader scaled the probe and the mismatch warnings) is ``notes_json``.
    """
    scalars, arrays = split_params(provenance.params)
    params_json = json.dumps(scalars, sort_keys=True, default=str)
    with atomic_h5_write(path) as f:
        f.create_dataset("object", data=recon.object.astype(np.complex64, copy=False))
        f.create_dataset("amplitude", data=recon.amplitude.astype(np.float32))
        f.create_dataset("phase", data=recon.phase.astype(np.float32))
        f.create_dataset("weight", data=recon.weight)
        f.create_dataset("x_coords", data=recon.x_coords)
        f.create_dataset("y_coords", data=recon.y_coords)
        f.create_dataset("positions", data=np.asarray(positions, dtype=np.float64))
        f["positions"].attrs["columns"] = "x, y (object pixels, patch centres)"
        for key, value in arrays.items():
            f.create_dataset(f"params/{key}", data=value)
        if recon.probe is not None:
            source = recon.refinement.get("probe_source", "the scan's") if recon.refinement else "the scan's"
            f.create_dataset("probe", data=np.asarray(recon.probe, dtype=np.complex64))
        elif "probe" in arrays:
            source = "the bundle's training probe (the network's object was not refined against the scan)"
            f.create_dataset("probe", data=arrays["probe"])
        else:
            source = "none"
        if "probe" in f:
            f["probe"].attrs["source"] = source
        f.attrs["probe_source"] = source
        f.attrs["refined"] = recon.refinement is not None
        if recon.refinement is not None:
            f.attrs["refinement_json"] = json.dumps(recon.refinement, sort_keys=True, default=str)
        if notes:
            f.attrs["notes_json"] = json.dumps(dict(notes), sort_keys=True, default=str)
        f.attrs["format"] = RECONSTRUCTION_FORMAT
        f.attrs["producer"] = f"ptycho-runtime {__version__}"
        f.attrs["params_json"] = params_json
        f.attrs["bundle_path"] = str(Path(provenance.bundle_path).resolve())
        f.attrs["scan_path"] = str(Path(scan_path).resolve())
        f.attrs["backend"] = provenance.backend
        f.attrs["device"] = provenance.device
        f.attrs["providers"] = json.dumps(list(provenance.providers))
        f.attrs["patterns_per_second"] = float(patterns_per_second)
        f.attrs["elapsed_s"] = float(elapsed_s)
        f.attrs["n_patterns"] = int(np.asarray(positions).shape[0])
        f.attrs["N"] = int(provenance.params["N"])
        f.attrs["gridsize"] = int(provenance.params["gridsize"])
        f.attrs["intensity_scale"] = float(provenance.params["intensity_scale"])
        f.attrs["description"] = (
            "object = Σ w·patch / Σ w (complex64); amplitude/phase = |object|, angle(object); weight = Σ w "
            "(0 = not covered); x_coords/y_coords = object-pixel coordinates of the columns/rows, in the frame "
            "of positions.")
