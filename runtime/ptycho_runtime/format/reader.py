"""The one definition of the ptycho-export bundle: how it is written, and the one policy for reading it.

Both the training side (`ptycho_export`, which writes bundles) and the runtime
(which reads them) use this module, so the layout, the limits and the checks
live in exactly one place: ``write_bundle`` and ``write_graphs`` are the only
code that names a group path for writing, ``read_bundle`` (→ ``BundleContents``)
the only code that reads one. It needs only numpy and h5py (and the ``onnx``
package, imported lazily, for ``check_onnx_graph``), so the write → read
round trip is tested without torch.

Layout (every dataset carries a ``sha256`` attribute over its bytes)::

    /                                  attrs: format, format_version, producer, *_version, created_utc, description
    /params/config_json                JSON of every scalar params.cfg key
    /params/arrays/<key>               array-valued params (e.g. the complex probe)
    /models/<name>/architecture_json   the architecture config the model is rebuilt from
    /models/<name>/state_dict/<key>    one dataset per tensor (dtype and shape preserved)
    /training/summary_json             intensity scale used, epochs, wall time ...
    /training/history/<metric>         loss per epoch
    /graphs/<kind>/<model>/bytes       uint8: a compiled graph (kind: onnx, torchscript)
    /graphs/<kind>/<model>/metadata_json
    /parity/<case>/<input or output>   fixed inputs (in the units ``Bundle.predict`` takes) and eager outputs
    /physics/metadata_json             optional: the instrument the model was trained for (``PHYSICS_KEYS``)

Why a reader policy: a bundle is a file users download, mail around and drop
into acquisition software, so every reader treats it as hostile. HDF5 can
point outside the file (external links, external raw storage, virtual
datasets), declare shapes far larger than the bytes it holds, and compress a
GiB into a MB. ``read_bundle`` therefore refuses, before reading any payload:
a path that is not a regular file; any link other than a hard link; external
storage; virtual datasets; any filter (the writer uses none, so there is no
decompression to bound); any object, dtype or shape the schema below does not
allow; and any dataset whose declared size exceeds its schema limit, its
stored bytes or the file. Checksums are then verified (messages never echo a
hash or the bytes that failed), params are checked against each other, and
graph metadata against params. Every failure is a ``BundleError`` subclass
naming the dataset and the fix; nothing else escapes a reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import math
import numbers
import os
import pickletools
import re
import shutil
import socket
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import h5py
import numpy as np

FORMAT_NAME = "ptycho-export-bundle"
FORMAT_VERSION = 1
BUNDLE_FILENAME = "wts.h5"
CHECKSUM_ATTR = "sha256"
MODEL_NAMES = ("autoencoder", "diffraction_to_obj")
GRAPH_KINDS = ("onnx", "torchscript")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

# ---------------------------------------------------------------- limits (documented in docs/bundle-format.md)

ALLOWED_N = (64, 128, 256)
MAX_GRIDSIZE = 3
OUTPUT_NAMES = {"amp_phase": ("amplitude", "phase"), "real_imag": ("real", "imag")}
MAX_FILTERS_SCALE = 8
# Upper bound of one model's state_dict bytes at n_filters_scale = 1, per N (the largest gridsize, +5 %);
# weights scale with n_filters_scale², so a model may hold at most n_filters_scale² × this. A torch test pins it.
WEIGHT_BYTES_PER_SCALE2 = {64: 2_560_000, 128: 5_220_000, 256: 14_520_000}
MAX_TENSORS_PER_MODEL = 256
MAX_GRAPH_BYTES = 512 * 2**20          # one compiled graph
MAX_JSON_BYTES = 4 * 2**20             # one JSON document
MAX_JSON_DEPTH = 32
MAX_ATTR_STRING = 4096                 # one string attribute
MAX_PARAM_ARRAYS = 16
MAX_HISTORY_METRICS = 64
MAX_EPOCHS = 1_000_000
MAX_PARITY_CASES = 8
MAX_PARITY_BATCH = 64
MAX_PARITY_ENTRIES = 32                # datasets in one parity case
MAX_CHILDREN = 64                      # links in any other group
MAX_ATTRS = 64                         # attributes on any object
# TorchScript archives: zip entries, and the globals their pickles may name (what torch.jit.save writes)
MAX_ZIP_ENTRIES = 10_000
TORCHSCRIPT_PICKLE_GLOBALS = re.compile(r"^(torch\._utils\._rebuild_\w+|torch\.\w*Storage|collections\.OrderedDict"
                                        r"|torch\.jit\._pickle\.\w+|__torch__(\.\w+)+|torch\.(device|Size)"
                                        r"|torch\._tensor\._rebuild_from_type_v2|builtins\.(set|frozenset))$")
# ONNX: the ops torch.onnx.export(dynamo=True) emits for our two models, collected over gridsize 1-3, both output
# modes, every amp_activation, object.big/probe.big/probe.mask variants (+ Constant, Identity, Cast,
# which other exporter versions may add). No control flow (Loop/Scan/If), nothing that makes shapes from data
# (ConstantOfShape, Range, Tile). tests/hostile/test_limits.py pins the exporter's output to this list.
ONNX_ALLOWED_DOMAINS = ("", "ai.onnx")
ONNX_ALLOWED_OPS = frozenset("""
    Add Cast Clip Concat Constant Conv Cos Div Expand Gather Greater GridSample Identity MatMul MaxPool Mul Neg Pad
    ReduceSum Relu Reshape Resize Shape Sigmoid Sin Slice Softplus Sqrt Squeeze Sub Tanh Unsqueeze Where
""".split())
ONNX_ELEM_FLOAT = 1
# The opset ptycho-export writes ONNX graphs at (torch.export's exporter needs 18 or newer). Defined here, torch-free,
# so the CLI's --help shows it without importing the exporter.
DEFAULT_OPSET = 20
# /physics/metadata_json (optional; bundles before it load as "unknown"): the instrument a model was trained for,
# so a host can be checked against it (ptycho_runtime.physics). Each value is a finite number > 0, or null.
PHYSICS_KEYS = {
    "photon_energy_eV": "photon energy (eV)",
    "detector_distance_m": "sample-detector distance (m)",
    "detector_pixel_size_m": "detector pixel size (m)",
    "object_pixel_size_m": "object (probe) pixel size (m): lambda * distance / (N * detector pixel)",
}


# --------------------------------------------------------------------------- errors


class BundleError(ValueError):
    """Base of every error a bundle reader raises (a ValueError: the input is bad, not the program).

    ``path`` is the bundle, ``dataset`` the HDF5 path inside it (or None).
    """

    def __init__(self, message: str, path: Any = None, dataset: Optional[str] = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.dataset = dataset


class BundleFormatError(BundleError):
    """The file is not a readable bundle of a version this package understands."""


class BundleNotFoundError(BundleFormatError, FileNotFoundError):
    """No bundle at the given path (also a FileNotFoundError, as before)."""


class BundleUnsafeError(BundleFormatError):
    """The file tries to reach outside itself or to run something it must not (links, external data, ops)."""


class BundleLimitError(BundleFormatError):
    """A declared size exceeds what the schema allows or what the file holds."""


class BundleParamsError(BundleFormatError):
    """Params are missing, of the wrong type, out of range, or disagree with the graphs or weights."""


class BundleGraphMissingError(BundleFormatError):
    """The bundle has no graph of the requested kind (a valid bundle; add graphs with ptycho-export)."""


class BundleIntegrityError(BundleFormatError):
    """The bundle's contents are not what was written: damaged, or modified after export."""


class BundleChecksumError(BundleIntegrityError):
    """A payload's bytes do not match the checksum stored beside them."""


def _fix_damaged(path: Any) -> str:
    return f"Copy {path} again from its source, or re-export it with ptycho-export."


def resolve_bundle_path(path: str | os.PathLike) -> Path:
    """Accept a bundle file or a folder holding ``wts.h5`` (the workflows' layout)."""
    p = Path(path)
    if p.is_dir():
        p = p / BUNDLE_FILENAME
    if not p.exists():
        raise BundleNotFoundError(
            f"No bundle at {p}: pass the path of a bundle file, or a folder that contains {BUNDLE_FILENAME}.", p)
    return p


# --------------------------------------------------------------------------- checksums


def payload_bytes(value: np.ndarray | bytes | str) -> bytes:
    """The exact bytes a checksum covers: UTF-8 for text, C-order raw bytes for arrays."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return np.asarray(value).tobytes(order="C")


def sha256_hex(value: np.ndarray | bytes | str) -> str:
    """The hex sha256 of ``payload_bytes(value)``: what every dataset's ``sha256`` attribute holds."""
    return hashlib.sha256(payload_bytes(value)).hexdigest()


# --------------------------------------------------------------------------- writing


def write_payload(group: h5py.Group, name: str, value: np.ndarray | bytes | str, **attrs: Any) -> h5py.Dataset:
    """Write one dataset with its checksum. Text is stored as a UTF-8 string so h5dump shows it.

    No filters and no chunking: the reader refuses filtered datasets (nothing to decompress, so no bombs).
    """
    if name in group:
        del group[name]
    if isinstance(value, str):
        ds = group.create_dataset(name, data=value, dtype=h5py.string_dtype("utf-8"))
    elif isinstance(value, (bytes, bytearray)):
        ds = group.create_dataset(name, data=np.frombuffer(bytes(value), dtype=np.uint8))
    else:
        ds = group.create_dataset(name, data=np.asarray(value))  # 0-d stays 0-d
    ds.attrs[CHECKSUM_ATTR] = sha256_hex(value)
    for key, val in attrs.items():
        ds.attrs[key] = val
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

    f.attrs["format"] = FORMAT_NAME
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["producer"] = str(producer)
    f.attrs["created_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    f.attrs["description"] = (
        "PtychoPINN model bundle: params (/params), eager weights (/models), training history "
        "(/training), compiled graphs (/graphs) and parity vectors (/parity). Every dataset has a "
        "sha256 attribute. Read with ptycho_runtime.load_bundle or ptycho_export.load_torch_bundle."
    )
    for name, version in versions.items():
        f.attrs[f"{name}_version"] = str(version)


_TMP_SUFFIX = ".tmp"


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}."


def _remove_stale_temps(target: Path) -> list[Path]:
    """Remove temporary files of crashed writers of ``target`` on this host (their pid is gone).

    Temp names are ``.<name>.<host>.<pid>.<random>.tmp``: a file is removed only
    when it was made on this host by a process that no longer exists, so a
    concurrent writer (same or other host, e.g. on a network folder) is never
    disturbed. Returns what was removed.
    """
    host = _host_token()
    prefix = _tmp_prefix(target)
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(_TMP_SUFFIX)):
            continue
        parts = name[len(prefix):-len(_TMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if _pid_alive(int(parts[1])):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def _host_token() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or unknown: keep the file
    return True


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: fsync the folder that holds the entry (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike, copy_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block finishes.

    The one atomic-write helper of the project: the temporary file is in the
    same folder (so ``os.replace`` is atomic), gets the mode a plain ``open``
    would give (an existing file keeps its mode), is fsynced before the rename,
    and the folder is fsynced after it. On any exception the temporary file is
    removed and ``path`` is untouched. Temporary files of writers that were
    killed (no cleanup possible) are named after host and pid, and removed by
    the next write to the same path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = target.parent / f"{_tmp_prefix(target)}{_host_token()}.{os.getpid()}.{os.urandom(6).hex()}{_TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        try:
            mode = target.stat().st_mode & 0o777
        except FileNotFoundError:
            mask = os.umask(0)
            os.umask(mask)
            mode = 0o666 & ~mask
        os.chmod(tmp, mode)
        if copy_existing:
            shutil.copyfile(target, tmp)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_h5_write(path: str | os.PathLike, copy_existing: bool = False) -> Iterator[h5py.File]:
    """Yield an open HDF5 file that replaces ``path`` only if the block finishes (see ``atomic_write_path``).

    Any HDF5 file: bundles, and the reconstruction files of ``files.reconstruction_file``.
    With ``copy_existing`` the file starts as a copy of ``path`` (for in-place
    updates such as adding graphs).
    """
    with atomic_write_path(path, copy_existing) as tmp:
        f = h5py.File(tmp, "r+" if copy_existing else "w")
        try:
            yield f
        finally:
            f.close()


# --------------------------------------------------------------------------- contents


@dataclass
class GraphRecord:
    """One compiled graph: its bytes and its metadata.

    Read back by ``read_bundle``, the bytes are checksum-verified and the
    metadata checked against the params; handed to ``write_graphs``, they are
    what gets stored.
    """

    kind: str
    model: str
    data: bytes
    metadata: dict[str, Any]


@dataclass
class BundleContents:
    """Everything in a bundle, read into memory and verified; the file is closed again.

    What every reader needs, so none opens the file itself: ``header`` (root
    attributes), ``params`` (scalars and arrays merged, validated),
    ``architectures`` and ``state_dicts`` per model, ``n_parameters`` per
    model, ``training`` (summary) and ``history`` (per-epoch metrics),
    ``graphs`` by (kind, model), ``parity`` cases, and ``file_size``.
    """

    path: Path
    header: dict[str, Any]
    params: dict[str, Any]
    architectures: dict[str, dict[str, Any]] = field(default_factory=dict)
    state_dicts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    history: dict[str, np.ndarray] = field(default_factory=dict)
    graphs: dict[tuple[str, str], GraphRecord] = field(default_factory=dict)
    parity: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    n_parameters: dict[str, int] = field(default_factory=dict)
    file_size: int = 0
    physics: dict[str, Optional[float]] = field(default_factory=dict)

    def graph(self, kind: str, model: str) -> GraphRecord:
        try:
            return self.graphs[(kind, model)]
        except KeyError:
            have = ", ".join(f"{k}/{m}" for k, m in sorted(self.graphs)) or "none"
            raise BundleGraphMissingError(
                f"The bundle {self.path} has no {kind} graph for {model} (graphs present: {have}). "
                f"Add graphs with: ptycho-export {self.path}", self.path, f"/graphs/{kind}/{model}"
            ) from None


# --------------------------------------------------------------------------- writing a bundle


@dataclass
class ModelRecord:
    """One model as the writer stores it: the architecture it is rebuilt from and its tensors (numpy)."""

    architecture: dict[str, Any]
    state_dict: Mapping[str, np.ndarray]
    n_parameters: int


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
    with atomic_h5_write(target) as f:
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
    with atomic_h5_write(path, copy_existing=True) as f:
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


# --------------------------------------------------------------------------- opening


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without blocking and make sure it is a regular file.

    ``stat`` first (a FIFO or device is refused without being opened), then
    ``O_NONBLOCK`` open and ``fstat`` on the descriptor (the file cannot be
    swapped for a FIFO in between).
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BundleNotFoundError(f"Cannot access {path} ({exc.strerror}).", path) from None
    if stat.S_ISDIR(st.st_mode):
        raise BundleFormatError(f"{path} is a folder without {BUNDLE_FILENAME}. Pass the bundle file.", path)
    if not stat.S_ISREG(st.st_mode):
        raise BundleUnsafeError(f"{path} is not a regular file (a FIFO, socket or device); a bundle is a plain "
                                "file. Pass the path of a wts.h5 file.", path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise BundleFormatError(f"Cannot open {path} ({exc.strerror}). Check its permissions.", path) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BundleUnsafeError(f"{path} is not a regular file; a bundle is a plain file.", path)
    return fd, st


def _open_h5(path: Path) -> tuple[h5py.File, int]:
    fd, st = _open_regular(path)
    try:
        magic = os.pread(fd, 8, 0)
        if magic != HDF5_MAGIC:
            kind = "a zip archive (a PtychoPINN/dill bundle?)" if magic[:2] == b"PK" else "not an HDF5 file"
            raise BundleFormatError(
                f"{path} is {kind}, not a ptycho-export bundle. Bundles are HDF5 files written by "
                "save_torch_bundle (ptycho-export train writes <output-dir>/wts.h5).", path)
        # open what was checked: on Linux through our descriptor (the path could be swapped for a FIFO, on
        # which a plain open would block); elsewhere by path, with the inode compared below
        by_fd = f"/proc/self/fd/{fd}"
        try:
            f = h5py.File(by_fd if os.path.exists(by_fd) else path, "r")
        except Exception as exc:  # noqa: BLE001 - h5py raises OSError, ValueError, RuntimeError... for damage
            raise BundleFormatError(
                f"{path} starts like an HDF5 file but cannot be opened ({type(exc).__name__}); it is probably "
                f"truncated or damaged. {_fix_damaged(path)}", path) from None
        try:  # the file h5py opened is the regular file we checked (not swapped in between)
            st2 = os.fstat(f.id.get_vfd_handle())
            same = (st2.st_ino, st2.st_dev) == (st.st_ino, st.st_dev)
        except Exception:  # noqa: BLE001 - a driver without a descriptor: compare by path
            st2 = os.stat(path)
            same = (st2.st_ino, st2.st_dev) == (st.st_ino, st.st_dev)
        if not same:
            f.close()
            raise BundleUnsafeError(f"{path} changed while it was being opened; open it again.", path)
        return f, st.st_size
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the policy walk


@dataclass
class _DatasetPlan:
    ds: h5py.Dataset
    kind: str  # "json" | "array"
    nbytes: int


class _Policy:
    """Walks the tree by schema, checking every link, object, attribute and declared size before any read."""

    def __init__(self, f: h5py.File, path: Path, file_size: int) -> None:
        self.f = f
        self.path = path
        self.file_size = file_size
        self.total_bytes = 0

    # ------------------------------------------------------------------ errors

    def unsafe(self, where: str, what: str) -> BundleUnsafeError:
        return BundleUnsafeError(
            f"{self.path}: {where} {what}. A bundle must not reach outside its own file; this one was crafted or "
            "edited by hand. Do not use it; re-export the model with ptycho-export.", self.path, where)

    def bad(self, where: str, what: str) -> BundleFormatError:
        return BundleFormatError(f"{self.path}: {where} {what}. {_fix_damaged(self.path)}", self.path, where)

    def limit(self, where: str, what: str) -> BundleLimitError:
        return BundleLimitError(f"{self.path}: {where} {what}. The bundle is damaged or crafted; "
                                f"{_fix_damaged(self.path)}", self.path, where)

    # ------------------------------------------------------------------ structure

    def child(self, group: h5py.Group, name: str, want: str) -> Any:
        """The object behind one link of ``group``: only a hard link to an object of class ``want``.

        Low-level calls (the link's class is read without following it): the walk runs on every load.
        """
        bname = name.encode()
        try:
            ltype = group.id.links.get_info(bname).type
        except Exception:  # noqa: BLE001 - user-defined link classes h5py cannot represent
            raise self.unsafe(f"{group.name.rstrip('/')}/{name}", "is a link of an unknown class") from None
        if ltype != h5py.h5l.TYPE_HARD:
            what = {h5py.h5l.TYPE_EXTERNAL: "is an external link (to another file)",
                    h5py.h5l.TYPE_SOFT: "is a soft link"}.get(ltype, "is a link of an unknown class")
            raise self.unsafe(f"{group.name.rstrip('/')}/{name}", what)
        oid = h5py.h5o.open(group.id, bname)
        kind = h5py.h5i.get_type(oid)
        if want == "group" and kind == h5py.h5i.GROUP:
            return h5py.Group(oid)
        if want == "dataset" and kind == h5py.h5i.DATASET:
            return h5py.Dataset(oid)
        raise self.bad(f"{group.name.rstrip('/')}/{name}", f"should be a {want}")

    def names(self, group: h5py.Group, max_children: int) -> list[str]:
        """The link names of ``group`` (their number is checked before they are listed)."""
        n = group.id.get_num_objs()
        if n > max_children:
            raise self.limit(group.name, f"holds {n} entries; the format allows at most {max_children}")
        return [raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw) for raw in group.id.__iter__()]

    def children(self, group: h5py.Group, allowed: Optional[Callable[[str], bool]], max_children: int,
                 want: str) -> dict[str, Any]:
        """Name → object for every link of ``group``, all of class ``want`` and with names ``allowed``."""
        out: dict[str, Any] = {}
        for name in self.names(group, max_children):
            if allowed is not None and not allowed(name):
                raise self.bad(f"{group.name.rstrip('/')}/{name}", "is not part of the bundle format")
            out[name] = self.child(group, name, want)
        return out

    def mixed(self, group: h5py.Group, spec: Mapping[str, str]) -> dict[str, Any]:
        """Children of a group whose schema mixes groups and datasets (``spec``: name → "group" | "dataset")."""
        out: dict[str, Any] = {}
        for name in self.names(group, len(spec)):
            if name not in spec:
                raise self.bad(f"{group.name.rstrip('/')}/{name}", "is not part of the bundle format")
            out[name] = self.child(group, name, spec[name])
        return out

    def check_attrs(self, obj: Any, allowed: tuple[str, ...] | Callable[[str], bool]) -> None:
        """Only the schema's attributes (``allowed``) are ever read; each must be a scalar string or integer.

        Others are counted (at most ``MAX_ATTRS``) but never read.
        """
        n = h5py.h5a.get_num_attrs(obj.id)
        if n > MAX_ATTRS:
            raise self.limit(obj.name, f"has {n} attributes; the format allows at most {MAX_ATTRS}")
        names = allowed if isinstance(allowed, tuple) else [a for a in obj.attrs if allowed(a)]
        for name in names:
            if not h5py.h5a.exists(obj.id, name.encode()):
                continue
            aid = h5py.h5a.open(obj.id, name.encode())
            dt = aid.dtype
            if aid.shape != ():
                raise self.bad(f"{obj.name}@{name}", f"is an attribute of shape {aid.shape}; expected a scalar")
            vlen = h5py.check_string_dtype(dt)
            if vlen is not None:
                if vlen.length is not None and vlen.length > MAX_ATTR_STRING:
                    raise self.limit(f"{obj.name}@{name}", "is a string attribute longer than "
                                     f"{MAX_ATTR_STRING} bytes")
            elif dt.kind not in "iu":
                raise self.bad(f"{obj.name}@{name}", f"has dtype {dt}; expected a string or an integer")

    def dataset(self, ds: h5py.Dataset, kind: str, max_bytes: int, dtype_kinds: str = "",
                ndim: Optional[int] = None) -> _DatasetPlan:
        """Check one dataset's storage, dtype and declared size (nothing is read)."""
        where = ds.name
        self.check_attrs(ds, (CHECKSUM_ATTR,))
        dcpl = ds.id.get_create_plist()
        layout = dcpl.get_layout()
        if layout == h5py.h5d.VIRTUAL:
            raise self.unsafe(where, "is a virtual dataset (its data live in other files)")
        if dcpl.get_external_count() > 0:
            raise self.unsafe(where, "uses external raw storage (its bytes live in another file)")
        if layout not in (h5py.h5d.COMPACT, h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED):
            raise self.unsafe(where, f"has a storage layout ({layout}) the format does not use")
        if dcpl.get_nfilters() > 0:
            raise self.unsafe(where, "is compressed or filtered; the format stores every dataset unfiltered "
                                     "(nothing to decompress)")
        dt = ds.dtype
        if kind == "json":
            info = h5py.check_string_dtype(dt)
            if info is None or info.length is not None or ds.shape != ():
                raise self.bad(where, f"should be a scalar UTF-8 string (got {dt} {ds.shape})")
            return _DatasetPlan(ds, kind, 0)  # a variable-length string lives in the file: bounded by it
        if dt.kind not in dtype_kinds or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
            raise self.bad(where, f"has dtype {dt}, which the format does not use here")
        shape = ds.shape
        if shape is None or (ndim is not None and len(shape) != ndim):
            raise self.bad(where, f"has shape {shape}; expected {ndim} dimensions")
        nbytes = int(np.prod(shape, dtype=object)) * dt.itemsize
        if nbytes > max_bytes:
            raise self.limit(where, f"declares {nbytes} bytes ({shape}); the format allows at most {max_bytes} here")
        if nbytes > 0 and ds.id.get_storage_size() < nbytes:
            raise self.limit(where, f"declares {nbytes} bytes but stores only {ds.id.get_storage_size()}")
        self.total_bytes += nbytes
        if self.total_bytes > self.file_size:
            raise self.limit(where, f"brings the declared data to {self.total_bytes} bytes, more than the "
                                    f"file's {self.file_size}")
        return _DatasetPlan(ds, kind, nbytes)


# --------------------------------------------------------------------------- reading values


def _read_plan(policy: _Policy, plan: _DatasetPlan) -> Any:
    """Read one planned dataset and verify its checksum (the error never shows hashes or data)."""
    ds, where = plan.ds, plan.ds.name
    expected = _scalar_attr(ds, CHECKSUM_ATTR)
    if isinstance(expected, bytes):
        try:
            expected = expected.decode("ascii")
        except UnicodeDecodeError:
            expected = None
    if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected):
        what = "has no" if expected is None else "has an invalid"
        raise BundleChecksumError(
            f"{policy.path}: {where} {what} {CHECKSUM_ATTR} attribute: the bundle was not written by "
            "ptycho-export or was edited by hand. Re-create it with save_torch_bundle.", policy.path, where)
    if plan.kind == "json":
        raw = ds[()]
        if not isinstance(raw, bytes) or len(raw) > MAX_JSON_BYTES:
            raise policy.limit(where, f"is not a JSON text of at most {MAX_JSON_BYTES} bytes")
        value: Any = raw
        digest = hashlib.sha256(raw).hexdigest()
    else:
        value = np.empty(ds.shape, ds.dtype)
        if value.size:
            ds.id.read(h5py.h5s.ALL, h5py.h5s.ALL, value)
        digest = hashlib.sha256(value.reshape(-1).view(np.uint8)).hexdigest()  # the C-order bytes, no copy
    if not hmac.compare_digest(digest, expected):
        raise BundleChecksumError(
            f"{policy.path}: Checksum mismatch in {where}. The bundle is damaged or was modified; "
            f"{_fix_damaged(policy.path)}", policy.path, where)
    if plan.kind == "json":
        return _parse_json(policy, where, value)
    return value


def _parse_json(policy: _Policy, where: str, raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise policy.bad(where, "is not valid UTF-8") from None
    depth = max_depth = 0
    in_str = esc = False
    for ch in text:  # cheap depth bound before json (deeply nested JSON is a recursion bomb)
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            max_depth = max(max_depth, depth)
            if depth > MAX_JSON_DEPTH:
                raise policy.limit(where, f"nests JSON deeper than {MAX_JSON_DEPTH} levels")
        elif ch in "]}":
            depth -= 1
    try:
        return json.loads(text, parse_constant=_json_constant)
    except (ValueError, RecursionError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "invalid JSON"
        raise policy.bad(where, f"is not valid JSON ({msg})") from None


def _json_constant(name: str) -> float:
    return float(name)  # NaN / Infinity: allowed in JSON text, rejected where a finite number is needed


# --------------------------------------------------------------------------- header


def _scalar_attr(obj: Any, name: str) -> Any:
    """One scalar attribute, read low-level (None if absent); ``check_attrs`` has checked its type and shape."""
    bname = name.encode()
    if not h5py.h5a.exists(obj.id, bname):
        return None
    aid = h5py.h5a.open(obj.id, bname)
    out = np.empty((), dtype=aid.dtype)
    aid.read(out)
    return out[()]


def _attr_value(obj: Any, name: str) -> Any:
    v = _scalar_attr(obj, name)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    elif isinstance(v, np.generic):
        v = v.item()
    return v


def _root_attr(name: str) -> bool:
    return name in ("format", "format_version", "producer", "created_utc", "description") or bool(
        re.fullmatch(r"[A-Za-z0-9_]{1,40}_version", name))


def check_header(f: h5py.File, path: Path) -> dict[str, Any]:
    """The root attributes, checked: the format name and an integer format version this reader knows."""
    policy = _Policy(f, path, 0)
    policy.check_attrs(f, _root_attr)
    fmt = _attr_value(f, "format")
    if fmt != FORMAT_NAME:
        shown = fmt if isinstance(fmt, str) and len(fmt) <= 64 else type(fmt).__name__
        raise BundleFormatError(
            f"{path} is an HDF5 file but not a ptycho-export bundle (root attribute 'format' is "
            f"{shown!r}, expected {FORMAT_NAME!r}).", path, "/")
    version = _attr_value(f, "format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleFormatError(f"{path} has no valid 'format_version' attribute (an integer >= 1). "
                                f"{_fix_damaged(path)}", path, "/")
    if version > FORMAT_VERSION:
        raise BundleFormatError(
            f"{path} uses bundle format version {version}; this package reads format version "
            f"{FORMAT_VERSION} and older. Upgrade ptycho-runtime / ptycho-export to read it.", path, "/")
    return {k: _attr_value(f, k) for k in f.attrs if _root_attr(k)}


# --------------------------------------------------------------------------- params


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def validate_params(params: Mapping[str, Any], path: Any = None, where: str = "/params/config_json") -> None:
    """Types and ranges of the params every reader relies on; raise ``BundleParamsError`` naming the key."""

    def fail(key: str, what: str) -> BundleParamsError:
        return BundleParamsError(f"{path}: params '{key}' {what}. The bundle is damaged or was edited; re-export "
                                 "it with ptycho-export.", path, where)

    missing = [k for k in ("N", "gridsize", "intensity_scale") if params.get(k) is None]
    if missing:
        raise BundleParamsError(f"Cannot reconstruct model architecture: the bundle {path} has no "
                                f"{' or '.join(missing)} in its params. Re-save the model with save_torch_bundle.",
                                path, where)
    N = params.get("N")
    if not _is_int(N) or N not in ALLOWED_N:
        raise fail("N", f"must be one of {', '.join(map(str, ALLOWED_N))} (got {_short(N)})")
    g = params.get("gridsize")
    if not _is_int(g) or not 1 <= g <= MAX_GRIDSIZE:
        raise fail("gridsize", f"must be an integer from 1 to {MAX_GRIDSIZE} (got {_short(g)})")
    s = params.get("intensity_scale")
    if not _is_number(s) or not math.isfinite(float(s)) or float(s) <= 0:
        raise fail("intensity_scale", f"must be a finite number > 0 (got {_short(s)})")
    mode = params.get("output_mode", "amp_phase")
    if mode not in OUTPUT_NAMES:
        raise fail("output_mode", f"must be one of {', '.join(OUTPUT_NAMES)} (got {_short(mode)})")
    nfs = params.get("n_filters_scale", 1)
    if not _is_int(nfs) or not 1 <= nfs <= MAX_FILTERS_SCALE:
        raise fail("n_filters_scale", f"must be an integer from 1 to {MAX_FILTERS_SCALE} (got {_short(nfs)})")
    for key in ("nphotons",):
        if key in params and (not _is_number(params[key]) or not math.isfinite(params[key]) or params[key] <= 0):
            raise fail(key, f"must be a finite number > 0 (got {_short(params[key])})")
    for key in ("amp_activation",):
        if key in params and not isinstance(params[key], str):
            raise fail(key, "must be a string")
    probe = params.get("probe")
    if probe is not None:
        p = np.asarray(probe)
        if p.dtype.kind != "c" or p.shape != (N, N):
            raise fail("probe", f"must be a complex [{N}, {N}] array (got {p.dtype} {list(p.shape)})")
        if not np.all(np.isfinite(p)):
            raise fail("probe", "contains NaN or inf")


def validate_physics(meta: Any, path: Any = None, where: str = "/physics/metadata_json") -> dict[str, Optional[float]]:
    """The physics metadata, checked: only ``PHYSICS_KEYS``, each a finite number > 0 or None.

    Raises ``BundleParamsError`` naming the key.
    """
    if not isinstance(meta, Mapping):
        raise BundleParamsError(f"{path}: {where} is not a JSON object. {_fix_damaged(path)}", path, where)
    out: dict[str, Optional[float]] = {}
    for key, value in meta.items():
        if key not in PHYSICS_KEYS:
            raise BundleParamsError(f"{path}: {where} has the unknown key {_short(key)} (known: "
                                    f"{', '.join(PHYSICS_KEYS)}). {_fix_damaged(path)}", path, where)
        if value is not None and (not _is_number(value) or not math.isfinite(float(value)) or float(value) <= 0):
            raise BundleParamsError(f"{path}: {where} '{key}' must be a finite number > 0 or null (got "
                                    f"{_short(value)}). {_fix_damaged(path)}", path, where)
        out[key] = None if value is None else float(value)
    return out


def write_physics(f: h5py.File, meta: Mapping[str, Any]) -> None:
    """Write ``/physics/metadata_json`` (validated first, so a bundle that saves also loads); None values are kept."""
    clean = validate_physics(dict(meta), "the physics metadata to save")
    if "physics" in f:
        del f["physics"]
    write_json(f.create_group("physics"), "metadata_json", clean)


def check_writable_params(scalars: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """The writer's side of the policy: refuse to write params the reader would refuse (``BundleParamsError``)."""
    merged = {**scalars, **arrays}
    validate_params(merged, "the params to save")
    shadow = sorted(set(scalars) & set(arrays))
    if shadow:
        raise BundleParamsError(f"params {shadow} are both scalars and arrays; store each key once.")
    if len(arrays) > MAX_PARAM_ARRAYS:
        raise BundleParamsError(f"{len(arrays)} array-valued params; a bundle holds at most {MAX_PARAM_ARRAYS}.")
    cap = int(merged["N"]) ** 2 * 16
    for key, arr in arrays.items():
        a = np.asarray(arr)
        if a.dtype.kind not in "biufc" or a.nbytes > cap:
            raise BundleParamsError(f"param '{key}' ({a.dtype} {list(a.shape)}) cannot be stored: array params are "
                                    f"numeric and at most N×N complex128 ({cap} bytes).")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


# --------------------------------------------------------------------------- graph metadata


def graph_io(kind: str, model: str, params: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    """The inputs and outputs (name, shape with "batch", dtype) a graph of this bundle must declare."""
    N, C = int(params["N"]), int(params["gridsize"]) ** 2
    patch = ["batch", C, N, N]
    inputs = [{"name": "diffraction", "shape": patch, "dtype": "float32"}]
    if model == "autoencoder":
        inputs.append({"name": "offsets", "shape": ["batch", C, 1, 2], "dtype": "float32"})
    if kind == "onnx":
        outputs = [{"name": n, "shape": patch, "dtype": "float32"}
                   for n in OUTPUT_NAMES[params.get("output_mode", "amp_phase")]]
        if model == "autoencoder":
            outputs.append({"name": "pred_amplitude", "shape": patch, "dtype": "float32"})
    else:
        outputs = [{"name": "object", "shape": patch, "dtype": "complex64"}]
        if model == "autoencoder":
            outputs += [{"name": "pred_amplitude", "shape": patch, "dtype": "float32"},
                        {"name": "pred_intensity", "shape": patch, "dtype": "float32"}]
    return inputs, outputs


def _check_graph_metadata(meta: Any, kind: str, model: str, params: Mapping[str, Any], data: bytes,
                          path: Path, where: str) -> None:
    def fail(what: str) -> BundleParamsError:
        return BundleParamsError(f"{path}: {where} {what}. Re-export the graphs with: ptycho-export --force {path}",
                                 path, where)

    if not isinstance(meta, dict):
        raise fail("is not a JSON object")
    inputs, outputs = graph_io(kind, model, params)
    for key, expected in (("inputs", inputs), ("outputs", outputs)):
        got = meta.get(key)
        if not isinstance(got, list) or not all(isinstance(x, dict) for x in got):
            raise fail(f"has no valid '{key}' list")
        plain = [{k: x.get(k) for k in ("name", "shape", "dtype")} for x in got]
        if plain != expected:
            raise fail(f"declares {key} {_short(plain)}, but the params (N, gridsize, output_mode) need {expected}")
    sha = meta.get("sha256")
    if sha is not None and not (isinstance(sha, str) and hmac.compare_digest(sha, sha256_hex(data))):
        raise BundleChecksumError(f"{path}: the bytes of {where} do not match the sha256 in its metadata. "
                                  f"{_fix_damaged(path)}", path, where)
    contract = meta.get("contract")
    if isinstance(contract, dict) and "intensity_scale" in contract:
        cs = contract["intensity_scale"]
        if not _is_number(cs) or not math.isclose(float(cs), float(params["intensity_scale"]), rel_tol=1e-6):
            raise fail(f"was exported for intensity_scale {_short(cs)}, but the params say "
                       f"{params['intensity_scale']!r}")


# --------------------------------------------------------------------------- read_bundle


_WRAPPED = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError, OverflowError, UnicodeError,
            RecursionError, MemoryError, ZeroDivisionError, EOFError)


@contextlib.contextmanager
def _opened(path: str | os.PathLike) -> Iterator[tuple[Path, h5py.File, int, dict[str, Any]]]:
    """Resolve, open as a regular HDF5 file, check the header; any other failure inside becomes a BundleFormatError."""
    p = resolve_bundle_path(path)
    f, size = _open_h5(p)
    try:
        try:
            yield p, f, size, check_header(f, p)
        except BundleError:
            raise
        except _WRAPPED as exc:
            raise BundleFormatError(f"{p} is damaged or incomplete ({type(exc).__name__}). {_fix_damaged(p)}",
                                    p) from None
    finally:
        with contextlib.suppress(Exception):
            f.close()


def check_bundle_file(path: str | os.PathLike) -> Path:
    """Fail fast on anything that is not a bundle: a regular HDF5 file with this format's header.

    Reads no payload (milliseconds), so commands can refuse a wrong file
    before importing torch or onnx; ``read_bundle`` still checks everything
    else. Returns the resolved path; raises only ``BundleError`` subclasses.
    """
    with _opened(path) as (p, *_):
        return p


def read_bundle(path: str | os.PathLike) -> BundleContents:
    """Open a bundle under the reader policy; return its verified contents in memory.

    Order: regular-file check, HDF5 magic, header, a walk of the whole tree by
    schema (links, storage, filters, dtypes, declared sizes) *before* any
    payload is read, then every payload read and checksum-verified, then
    params, weights and graph metadata checked against each other. Raises only
    ``BundleError`` subclasses.
    """
    with _opened(path) as (p, f, size, header):
        return _read_verified(f, p, header, size)


def _read_verified(f: h5py.File, p: Path, header: dict[str, Any], file_size: int) -> BundleContents:
    pol = _Policy(f, p, file_size)
    root = pol.children(f, lambda n: n in ("params", "models", "training", "graphs", "parity", "physics"), 6,
                        "group")
    if "params" not in root:
        raise BundleFormatError(f"{p} has no /params: the params it was trained with are missing. "
                                f"{_fix_damaged(p)}", p, "/params")
    no_attrs: tuple[str, ...] = ()  # groups carry no attributes the reader reads

    # ---- params first: N, gridsize and epochs bound everything else
    pg = root["params"]
    pol.check_attrs(pg, no_attrs)
    pkids = pol.mixed(pg, {"config_json": "dataset", "arrays": "group"})
    if "config_json" not in pkids:
        raise BundleFormatError(f"{p} has no /params/config_json: the params it was trained with are missing. "
                                f"{_fix_damaged(p)}", p, "/params/config_json")
    params = _read_plan(pol, pol.dataset(pkids["config_json"], "json", 0))
    if not isinstance(params, dict):
        raise BundleParamsError(f"{p}: /params/config_json is not a JSON object. {_fix_damaged(p)}", p,
                                "/params/config_json")
    N = params.get("N")
    N_bound = N if _is_int(N) and N in ALLOWED_N else max(ALLOWED_N)
    if "arrays" in pkids:
        arrays = pol.children(pkids["arrays"], None, MAX_PARAM_ARRAYS, "dataset")
        plans = {}
        for key, ds in arrays.items():
            if key in params:
                raise BundleParamsError(
                    f"{p}: /params/arrays/{key} shadows the scalar param '{key}' of config_json; a key may be "
                    f"stored once. {_fix_damaged(p)}", p, ds.name)
            plans[key] = pol.dataset(ds, "array", N_bound * N_bound * 16, "biufc")
        for key, plan in plans.items():
            params[key] = _read_plan(pol, plan)
    validate_params(params, p)
    C = params["gridsize"] ** 2
    contents = BundleContents(path=p, header=header, params=params, file_size=file_size)

    # ---- plan everything else (no payload read yet)
    json_plans: list[tuple[str, tuple, _DatasetPlan]] = []
    array_plans: list[tuple[str, tuple, _DatasetPlan]] = []
    if "models" in root:
        models = pol.children(root["models"], lambda n: n in MODEL_NAMES, len(MODEL_NAMES), "group")
        weight_cap = params.get("n_filters_scale", 1) ** 2 * WEIGHT_BYTES_PER_SCALE2[params["N"]]
        for name, g in models.items():
            pol.check_attrs(g, ("n_parameters",))
            kids = pol.mixed(g, {"architecture_json": "dataset", "state_dict": "group"})
            if "architecture_json" not in kids or "state_dict" not in kids:
                raise pol.bad(g.name, "lacks architecture_json or state_dict")
            json_plans.append(("arch", (name,), pol.dataset(kids["architecture_json"], "json", 0)))
            total = 0
            for key, ds in pol.children(kids["state_dict"], None, MAX_TENSORS_PER_MODEL, "dataset").items():
                plan = pol.dataset(ds, "array", weight_cap, "biufc")
                total += plan.nbytes
                if total > weight_cap:
                    raise pol.limit(kids["state_dict"].name, f"holds more than {weight_cap} bytes of weights, the "
                                    f"most a model with N={params['N']}, n_filters_scale="
                                    f"{params.get('n_filters_scale', 1)} can have")
                array_plans.append(("weight", (name, key), plan))
            n_par = _attr_value(g, "n_parameters")
            if _is_int(n_par):
                contents.n_parameters[name] = int(n_par)
    history_group = None
    if "training" in root:
        tg = root["training"]
        pol.check_attrs(tg, no_attrs)
        kids = pol.mixed(tg, {"summary_json": "dataset", "history": "group"})
        if "summary_json" in kids:
            contents.training = _read_plan(pol, pol.dataset(kids["summary_json"], "json", 0))
            if not isinstance(contents.training, dict):
                raise pol.bad(kids["summary_json"].name, "is not a JSON object")
        history_group = kids.get("history")
    if history_group is not None:
        epochs = MAX_EPOCHS
        for key in ("epochs_run", "nepochs", "epochs"):
            v = contents.training.get(key)
            if _is_int(v) and 0 <= v <= MAX_EPOCHS:
                epochs = max(int(v), 1)
                break
        for key, ds in pol.children(history_group, None, MAX_HISTORY_METRICS, "dataset").items():
            array_plans.append(("history", (key,), pol.dataset(ds, "array", epochs * 8, "fiu", ndim=1)))
    if "graphs" in root:
        for kind, kg in pol.children(root["graphs"], lambda n: n in GRAPH_KINDS, len(GRAPH_KINDS), "group").items():
            pol.check_attrs(kg, no_attrs)
            for model, g in pol.children(kg, lambda n: n in MODEL_NAMES, len(MODEL_NAMES), "group").items():
                pol.check_attrs(g, no_attrs)
                kids = pol.children(g, lambda n: n in ("bytes", "metadata_json"), 2, "dataset")
                if len(kids) != 2:
                    raise pol.bad(g.name, "needs both bytes and metadata_json")
                array_plans.append(("graph", (kind, model), pol.dataset(kids["bytes"], "array", MAX_GRAPH_BYTES,
                                                                        "u", ndim=1)))
                json_plans.append(("graph_meta", (kind, model), pol.dataset(kids["metadata_json"], "json", 0)))
    if "parity" in root:
        cases = pol.children(root["parity"], lambda n: bool(re.fullmatch(r"b[0-9]{1,2}", n)), MAX_PARITY_CASES,
                             "group")
        per = MAX_PARITY_BATCH * C * params["N"] ** 2 * 8
        for case, g in cases.items():
            pol.check_attrs(g, no_attrs)
            for key, ds in pol.children(g, _parity_key, MAX_PARITY_ENTRIES, "dataset").items():
                array_plans.append(("parity", (case, key), pol.dataset(ds, "array", per, "f", ndim=4)))

    if "physics" in root:
        phg = root["physics"]
        pol.check_attrs(phg, no_attrs)
        kids = pol.children(phg, lambda n: n == "metadata_json", 1, "dataset")
        if "metadata_json" in kids:
            json_plans.append(("physics", (), pol.dataset(kids["metadata_json"], "json", 0)))

    # ---- read and verify
    for what, key, plan in json_plans:
        value = _read_plan(pol, plan)
        if not isinstance(value, dict):
            raise pol.bad(plan.ds.name, "is not a JSON object")
        if what == "arch":
            contents.architectures[key[0]] = value
        elif what == "physics":
            contents.physics = validate_physics(value, p)
        else:
            contents.graphs[key] = GraphRecord(key[0], key[1], b"", value)
    for what, key, plan in array_plans:
        value = _read_plan(pol, plan)
        if what == "weight":
            contents.state_dicts.setdefault(key[0], {})[key[1]] = value
        elif what == "history":
            contents.history[key[0]] = value
        elif what == "graph":
            if plan.ds.dtype != np.uint8:
                raise pol.bad(plan.ds.name, "should be uint8 bytes")
            contents.graphs[key].data = value.tobytes()
        else:
            contents.parity.setdefault(key[0], {})[key[1]] = value
    for name in MODEL_NAMES:  # every model with weights has a state_dict group, maybe empty
        if name in contents.architectures:
            contents.state_dicts.setdefault(name, {})

    # ---- cross-checks
    for name, arch in contents.architectures.items():
        for key in ("N", "gridsize", "n_filters_scale", "output_mode"):
            if key in arch and key in params and arch[key] != params[key]:
                raise BundleParamsError(
                    f"{p}: /models/{name}/architecture_json has {key}={_short(arch[key])} but the params say "
                    f"{_short(params[key])}; the bundle was edited. {_fix_damaged(p)}", p,
                    f"/models/{name}/architecture_json")
    for (kind, model), rec in contents.graphs.items():
        _check_graph_metadata(rec.metadata, kind, model, params, rec.data, p, f"/graphs/{kind}/{model}")
    _check_parity_shapes(contents, pol)
    return contents


def _parity_key(name: str) -> bool:
    if name in ("input.amplitude", "input.diffraction", "input.offsets"):
        return True
    model, _, output = name.partition(".")
    return model in MODEL_NAMES and bool(re.fullmatch(r"[a-z_]{1,32}", output))


def _check_parity_shapes(contents: BundleContents, pol: _Policy) -> None:
    N, C = contents.params["N"], contents.params["gridsize"] ** 2
    for case, arrays in contents.parity.items():
        b = int(case[1:])
        for key, arr in arrays.items():
            expected = (b, C, 1, 2) if key == "input.offsets" else (b, C, N, N)
            if arr.shape != expected or arr.dtype != np.float32:
                raise pol.bad(f"/parity/{case}/{key}", f"has {arr.dtype} {list(arr.shape)}; expected float32 "
                                                       f"{list(expected)}")
        if "input.amplitude" not in arrays and "input.diffraction" not in arrays:
            raise pol.bad(f"/parity/{case}", "has no input.amplitude")


# ---------------------------------------------------------------- graphs: checked before a deserializer sees them


def check_onnx_graph(data: bytes, kind_model: tuple[str, str], params: Mapping[str, Any], path: Any = None
                     ) -> None:
    """Parse an ONNX model's protobuf and refuse what our exporter never writes, before onnxruntime sees it.

    Refused: external-data tensors (onnxruntime would open files relative to
    the working directory), functions, training info, operator domains other
    than the standard one, ops outside ``ONNX_ALLOWED_OPS`` (no Loop, Scan,
    If: no unbounded control flow), attributes holding subgraphs, and
    inputs/outputs whose names, element types or shapes differ from what the
    params require (``graph_io``).
    """
    _, model = kind_model
    where = f"/graphs/onnx/{model}/bytes"

    def unsafe(what: str) -> BundleUnsafeError:
        return BundleUnsafeError(f"{path}: the ONNX graph {where} {what}; ptycho-export never writes that, so the "
                                 "graph was crafted or edited. Do not use it; re-export with ptycho-export --force.",
                                 path, where)

    try:
        import onnx
        from onnx import AttributeProto, TensorProto
    except ImportError as exc:  # pragma: no cover - onnx is a dependency of ptycho-runtime
        raise ImportError("ptycho-runtime checks ONNX graphs with the onnx package: pip install onnx") from exc
    try:
        m = onnx.ModelProto()
        m.ParseFromString(bytes(data))
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise BundleFormatError(f"{path}: {where} is not a valid ONNX model. {_fix_damaged(path)}", path,
                                where) from None
    if len(m.functions) or len(m.training_info):
        raise unsafe("defines functions or training steps")
    for opset in m.opset_import:
        if opset.domain not in ONNX_ALLOWED_DOMAINS:
            raise unsafe(f"imports the operator domain {_short(opset.domain)}")
    g = m.graph

    def check_tensor(t: Any) -> None:
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            raise unsafe(f"stores tensor {_short(t.name)} as external data (a file outside the bundle)")

    for t in g.initializer:
        check_tensor(t)
    if len(g.sparse_initializer):
        raise unsafe("has sparse initializers")
    for node in g.node:
        if node.domain not in ONNX_ALLOWED_DOMAINS:
            raise unsafe(f"uses an operator of domain {_short(node.domain)}")
        if node.op_type not in ONNX_ALLOWED_OPS:
            raise unsafe(f"uses the operator {_short(node.op_type)}, which is not on the allow-list")
        for a in node.attribute:
            if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) or a.HasField("g") or len(a.graphs):
                raise unsafe(f"has a subgraph in node {_short(node.name)}")
            if a.HasField("t"):
                check_tensor(a.t)
            for t in a.tensors:
                check_tensor(t)
            if a.HasField("sparse_tensor") or len(a.sparse_tensors):
                raise unsafe("has sparse tensor attributes")
    inputs, outputs = graph_io("onnx", model, params)
    init_names = {t.name for t in g.initializer}
    for label, declared, expected in (("inputs", [v for v in g.input if v.name not in init_names], inputs),
                                      ("outputs", list(g.output), outputs)):
        got = [_value_info(v) for v in declared]
        want = [(e["name"], ONNX_ELEM_FLOAT, e["shape"]) for e in expected]
        if got != want:
            raise BundleParamsError(
                f"{path}: the ONNX graph {where} declares {label} {_short(got)}; the params (N, gridsize, "
                f"output_mode) need {want}. Re-export with: ptycho-export --force {path}", path, where)


def _value_info(v: Any) -> tuple[str, int, list]:
    t = v.type.tensor_type
    dims = []
    for d in t.shape.dim:
        dims.append(int(d.dim_value) if d.HasField("dim_value") else "batch")
    return v.name, int(t.elem_type), dims


def check_torchscript_archive(data: bytes, model: str, path: Any = None) -> None:
    """Refuse a TorchScript archive that is not what ``torch.jit.save`` writes, before torch sees it.

    A TorchScript archive is a zip of pickles, code and tensor data.
    ``torch.jit.load`` trusts it: its pickles are unpickled (by torch's own,
    restricted unpickler) and its code is compiled and runs with every op
    libtorch has (including file I/O ops such as ``aten::from_file``). Here,
    without torch: a zip with at most ``MAX_ZIP_ENTRIES`` entries, all stored
    uncompressed except code (declared sizes bounded: no zip bombs), no
    absolute or ``..`` names, and pickles
    whose globals are only the tensor-rebuild functions and ``__torch__``
    classes torch writes. What this cannot prove is that the TorchScript code
    is harmless: load TorchScript only from bundles whose source you trust, or
    use the ONNX backend (checked op by op).
    """
    where = f"/graphs/torchscript/{model}/bytes"

    def unsafe(what: str) -> BundleUnsafeError:
        return BundleUnsafeError(f"{path}: the TorchScript archive {where} {what}; torch.jit.save never writes "
                                 "that. Do not load it; re-export with ptycho-export --force, or use the ONNX "
                                 "backend.", path, where)

    try:
        zf = zipfile.ZipFile(io.BytesIO(bytes(data)))
        infos = zf.infolist()
    except Exception:  # noqa: BLE001 - BadZipFile, struct errors, ...
        raise BundleFormatError(f"{path}: {where} is not a TorchScript archive. {_fix_damaged(path)}", path,
                                where) from None
    if len(infos) > MAX_ZIP_ENTRIES:
        raise unsafe(f"has {len(infos)} entries")
    total = 0
    for info in infos:
        name = info.filename
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise unsafe(f"has an entry named {_short(name)}")
        if info.compress_type != zipfile.ZIP_STORED and not (
                info.compress_type == zipfile.ZIP_DEFLATED and "/code/" in f"/{name}"):
            raise unsafe(f"has a compressed entry {_short(name)} (torch compresses only code)")
        total += info.file_size
        if total > 4 * len(data) + 8 * 2**20:
            raise unsafe("declares far more uncompressed bytes than it holds (a zip bomb)")
    try:
        for info in infos:
            if info.filename.endswith(".pkl"):  # the debug_pkl files are never unpickled by torch.jit.load
                _check_pickle(zf.read(info), unsafe, info.filename)
    except BundleError:
        raise
    except Exception:  # noqa: BLE001 - a malformed pickle or zip member
        raise BundleFormatError(f"{path}: {where} holds a malformed pickle or zip entry. {_fix_damaged(path)}",
                                path, where) from None


def _check_pickle(blob: bytes, unsafe: Callable[[str], BundleUnsafeError], name: str) -> None:
    """Walk a pickle's opcodes (nothing is executed) and allow only the globals torch.jit.save writes."""
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(blob):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "STRING", "BINSTRING",
                       "SHORT_BINSTRING"):
            strings.append(str(arg))
            strings = strings[-2:]
            continue
        if op.name == "GLOBAL":
            target = str(arg).replace(" ", ".")
        elif op.name == "STACK_GLOBAL":
            if len(strings) < 2:
                raise unsafe(f"has a pickle ({name}) with a computed global")
            target = f"{strings[-2]}.{strings[-1]}"
        elif op.name in ("INST", "OBJ", "EXT1", "EXT2", "EXT4"):
            raise unsafe(f"has a pickle ({name}) using {op.name}")
        else:
            if op.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                strings = []
            continue
        if not TORCHSCRIPT_PICKLE_GLOBALS.match(target):
            raise unsafe(f"has a pickle ({name}) that names {_short(target)}")
        strings = []
