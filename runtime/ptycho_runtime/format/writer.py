"""Writing a bundle: ``write_bundle`` (params, models, training record) and ``write_graphs``, atomically.

The only code that names a group path for writing; params are checked with
the reader's own rules first (``check_writable_params``), so a bundle the
readers would refuse is never written. No filters and no chunking: the
reader refuses filtered datasets (nothing to decompress, so no bombs).
Format 2: HDF5 metadata with checksums (``BUNDLE_LIBVER``) and every string
fixed-length (``fixed_text``), so damage to the structure is a checksum
error from libhdf5, not a loop.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import h5py
import numpy as np

from .atomic import atomic_h5_write
from .checks import check_writable_params, validate_physics
from .checksum import sha256_hex
from .contents import GraphRecord, ModelRecord
from .schema import (
    BUNDLE_LIBVER,
    CHECKSUM_ATTR,
    FORMAT_NAME,
    FORMAT_VERSION,
    GRAPH_KINDS,
    MODEL_NAMES,
)


def fixed_text(text: str) -> np.ndarray:
    """``text`` as a 0-d fixed-length UTF-8 string: stored inside its object, where HDF5 checksums it.

    h5py's default for ``str`` is a variable-length string, which lives in the
    file's global heap: the one HDF5 structure without a checksum, and the one
    whose damage made libhdf5 loop (see ``format.isolated``).
    """
    raw = text.encode("utf-8")
    return np.array(raw, dtype=h5py.string_dtype("utf-8", max(len(raw), 1)))  # HDF5 has no 0-byte string type


def _attr(obj: Any, key: str, value: Any) -> None:
    if isinstance(value, str):
        obj.attrs.create(key, fixed_text(value))
    else:
        obj.attrs[key] = value


def write_payload(group: h5py.Group, name: str, value: np.ndarray | bytes | str, **attrs: Any) -> h5py.Dataset:
    """Write one dataset with its checksum. Text is stored as a fixed-length UTF-8 string so h5dump shows it.

    No filters and no chunking: the reader refuses filtered datasets (nothing to decompress, so no bombs).
    """
    if name in group:
        del group[name]
    if isinstance(value, str):
        ds = group.create_dataset(name, data=fixed_text(value))
    elif isinstance(value, (bytes, bytearray)):
        ds = group.create_dataset(name, data=np.frombuffer(bytes(value), dtype=np.uint8))
    else:
        ds = group.create_dataset(name, data=np.asarray(value))  # 0-d stays 0-d
    _attr(ds, CHECKSUM_ATTR, sha256_hex(value))
    for key, val in attrs.items():
        _attr(ds, key, val)
    return ds


def write_json(group: h5py.Group, name: str, value: Any) -> h5py.Dataset:
    """Write ``value`` as an indented, key-sorted JSON string dataset (with its checksum)."""
    return write_payload(group, name, json.dumps(value, indent=1, sort_keys=True, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"Cannot store a {type(obj).__name__} in a bundle's JSON metadata: {obj!r}")


def split_params(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Split a params dict into JSON scalars and array datasets: the one rule for writers.

    Arrays with at least one dimension (the complex probe) become datasets,
    kept complex; numpy scalars and 0-d arrays become Python numbers; paths
    become strings. Callers convert framework tensors to numpy first.
    """
    scalars: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for key, value in values.items():
        if isinstance(value, np.ndarray) and value.ndim > 0:
            arrays[key] = value
        elif isinstance(value, (np.ndarray, np.generic)):
            scalars[key] = value.item()
        elif isinstance(value, os.PathLike):
            scalars[key] = os.fspath(value)
        else:
            scalars[key] = value
    return scalars, arrays


def write_header(f: h5py.File, producer: str, versions: Mapping[str, str]) -> None:
    """The root attributes every reader checks first (format name and version), plus provenance."""
    import datetime

    _attr(f, "format", FORMAT_NAME)
    f.attrs["format_version"] = FORMAT_VERSION
    _attr(f, "producer", str(producer))
    _attr(f, "created_utc", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    _attr(f, "description", (
        "PtychoPINN model bundle: params (/params), eager weights (/models), training history "
        "(/training), compiled graphs (/graphs) and parity vectors (/parity). Every dataset has a "
        "sha256 attribute. Read with ptycho_runtime.load_bundle or ptycho_export.load_torch_bundle."
    ))
    for name, version in versions.items():
        _attr(f, f"{name}_version", str(version))


def write_bundle(path: str | os.PathLike, params: Mapping[str, Any], models: Mapping[str, ModelRecord],
                 producer: str, versions: Mapping[str, str], training: Optional[Mapping[str, Any]] = None,
                 history: Optional[Mapping[str, Any]] = None, physics: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a new bundle (params, eager models, training record), atomically; return its path.

    ``params`` is the flat params dict (``split_params`` decides what is JSON
    and what is a dataset); it is checked first with the reader's own rules
    (``check_writable_params``), so a bundle the readers would refuse is never
    written. ``models`` maps names from ``MODEL_NAMES`` to ``ModelRecord``.
    ``history`` maps a metric to its per-epoch values. ``physics``: the
    instrument (``PHYSICS_KEYS``), written to ``/physics`` when given. Graphs
    and parity vectors are added later by ``write_graphs``.
    """
    unknown = sorted(set(models) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"model names must be among {', '.join(MODEL_NAMES)} (got {unknown})")
    scalars, arrays = split_params(params)
    check_writable_params(scalars, arrays)
    target = Path(path)
    with atomic_h5_write(target, libver=BUNDLE_LIBVER) as f:
        write_header(f, producer, versions)
        pgroup = f.create_group("params")
        write_json(pgroup, "config_json", scalars)
        agroup = pgroup.create_group("arrays")
        for key, arr in arrays.items():
            write_payload(agroup, key, arr)
        mgroup = f.create_group("models")
        for name, record in models.items():
            _write_model(mgroup.create_group(name), record)
        tgroup = f.create_group("training")
        write_json(tgroup, "summary_json", dict(training or {}))
        hgroup = tgroup.create_group("history")
        for key, series in (history or {}).items():
            write_payload(hgroup, key, np.asarray(series, dtype=np.float64))
        if physics:
            write_physics(f, physics)
    return target


def _write_model(group: h5py.Group, record: ModelRecord) -> None:
    write_json(group, "architecture_json", record.architecture)
    group.attrs["n_parameters"] = int(record.n_parameters)
    sd_group = group.create_group("state_dict")
    for key, arr in record.state_dict.items():
        write_payload(sd_group, key, np.asarray(arr))


def write_graphs(path: str | os.PathLike, graphs: Iterable[GraphRecord],
                 parity: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Store compiled graphs and the parity cases they were proven on in an existing bundle, atomically.

    Graphs of the same kind and model are replaced; the parity cases replace
    the old ones as a whole (they are the eager outputs every stored graph is
    checked against, so they are written together with the graphs).
    """
    with atomic_h5_write(path, copy_existing=True, libver=BUNDLE_LIBVER) as f:
        f.attrs["format_version"] = FORMAT_VERSION  # what is added is written in this version's form
        ggroup = f.require_group("graphs")
        for g in graphs:
            if g.kind not in GRAPH_KINDS or g.model not in MODEL_NAMES:
                raise ValueError(f"graph {g.kind}/{g.model} is not part of the bundle format (kinds "
                                 f"{', '.join(GRAPH_KINDS)}, models {', '.join(MODEL_NAMES)})")
            group = ggroup.require_group(g.kind).require_group(g.model)
            write_payload(group, "bytes", g.data)
            write_json(group, "metadata_json", g.metadata)
        if "parity" in f:
            del f["parity"]
        pgroup = f.create_group("parity")
        for case_name, case in parity.items():
            cgroup = pgroup.create_group(case_name)
            for key, arr in case.items():
                write_payload(cgroup, key, arr)


def write_physics(f: h5py.File, meta: Mapping[str, Any]) -> None:
    """Write ``/physics/metadata_json`` (validated first, so a bundle that saves also loads); None values are kept."""
    clean = validate_physics(dict(meta), "the physics metadata to save")
    if "physics" in f:
        del f["physics"]
    write_json(f.create_group("physics"), "metadata_json", clean)
