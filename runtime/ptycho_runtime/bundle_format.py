"""The one definition of the ptycho-export bundle: an HDF5 file, no pickle.

Both the training side (`ptycho_export`, which writes bundles) and the runtime
(which reads them) use this module, so the layout lives in exactly one place.
It needs only numpy and h5py.

Layout (every dataset carries a ``sha256`` attribute over its bytes)::

    /                                  attrs: format, format_version, producer, versions, created_utc
    /params/config_json                JSON of every scalar params.cfg key
    /params/arrays/<key>               array-valued params (e.g. the complex probe)
    /models/<name>/architecture_json   the architecture config the model is rebuilt from
    /models/<name>/state_dict/<key>    one dataset per tensor (dtype and shape preserved)
    /training/summary_json             intensity scale used, epochs, wall time ...
    /training/history/<metric>         loss per epoch
    /graphs/<kind>/<model>/bytes       uint8: a compiled graph (kind: onnx, torchscript)
    /graphs/<kind>/<model>/metadata_json
    /parity/<case>/<input or output>   fixed inputs and the eager outputs for them

Why checksums on every dataset: a bundle travels between machines and is
opened inside acquisition software; a flipped bit in graph bytes must be caught
before the bytes reach a deserializer, and a silently damaged weight must not
produce a plausible-looking but wrong image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

FORMAT_NAME = "ptycho-export-bundle"
FORMAT_VERSION = 1
BUNDLE_FILENAME = "wts.h5"
CHECKSUM_ATTR = "sha256"
MODEL_NAMES = ("autoencoder", "diffraction_to_obj")
GRAPH_KINDS = ("onnx", "torchscript")


class BundleFormatError(ValueError):
    """The file is not a readable bundle of a version this package understands."""


class BundleChecksumError(BundleFormatError):
    """A payload's bytes do not match the checksum stored beside them."""


def resolve_bundle_path(path: str | os.PathLike) -> Path:
    """Accept a bundle file or a folder holding ``wts.h5`` (the workflows' layout)."""
    p = Path(path)
    if p.is_dir():
        p = p / BUNDLE_FILENAME
    if not p.exists():
        raise FileNotFoundError(
            f"No bundle at {p}: pass the path of a bundle file, or a folder that contains {BUNDLE_FILENAME}."
        )
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
    return hashlib.sha256(payload_bytes(value)).hexdigest()


def _read_dataset(ds: h5py.Dataset) -> np.ndarray | str:
    value = ds[()]
    if isinstance(value, bytes) and h5py.check_string_dtype(ds.dtype) is not None:
        return value.decode("utf-8")
    return value


def verify_dataset(ds: h5py.Dataset) -> np.ndarray | str:
    """Read a dataset and check it against its stored sha256; raise on mismatch or absence."""
    expected = ds.attrs.get(CHECKSUM_ATTR)
    if expected is None:
        raise BundleChecksumError(
            f"Dataset {ds.name} has no {CHECKSUM_ATTR} attribute: the bundle was not written by "
            "ptycho-export or was edited by hand. Re-create it with save_torch_bundle."
        )
    value = _read_dataset(ds)
    actual = sha256_hex(value)
    if isinstance(expected, bytes):
        expected = expected.decode()
    if actual != expected:
        raise BundleChecksumError(
            f"Checksum mismatch in {ds.name}: stored {expected[:12]}…, computed {actual[:12]}…. "
            "The bundle is damaged or was modified; copy it again from its source or re-export it."
        )
    return value


# --------------------------------------------------------------------------- writing


def write_payload(group: h5py.Group, name: str, value: np.ndarray | bytes | str, **attrs: Any) -> h5py.Dataset:
    """Write one dataset with its checksum. Text is stored as a UTF-8 string so h5dump shows it."""
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
    return write_payload(group, name, json.dumps(value, indent=1, sort_keys=True, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"Cannot store a {type(obj).__name__} in a bundle's JSON metadata: {obj!r}")


def write_header(f: h5py.File, producer: str, versions: dict[str, str]) -> None:
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


@contextlib.contextmanager
def atomic_bundle_write(path: str | os.PathLike, copy_existing: bool = False) -> Iterator[h5py.File]:
    """Yield an open HDF5 file that replaces ``path`` only if the block finishes.

    The data go to a temporary file in the same folder (so the final rename is
    atomic on POSIX and Windows); on any exception the temporary file is
    removed and whatever was at ``path`` before is untouched. With
    ``copy_existing`` the temporary file starts as a copy of ``path`` (for
    in-place updates such as adding graphs).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (keep an existing file's mode)
        try:
            mode = target.stat().st_mode & 0o777
        except FileNotFoundError:
            mask = os.umask(0)
            os.umask(mask)
            mode = 0o666 & ~mask
        os.chmod(tmp, mode)
        if copy_existing:
            shutil.copyfile(target, tmp)
            f = h5py.File(tmp, "r+")
        else:
            f = h5py.File(tmp, "w")
        try:
            yield f
        finally:
            f.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- reading


@dataclass
class GraphRecord:
    """One compiled graph: its bytes (already checksum-verified) and its metadata."""

    kind: str
    model: str
    data: bytes
    metadata: dict[str, Any]


@dataclass
class BundleContents:
    """Everything in a bundle, read into memory and verified; the file is closed again."""

    path: Path
    header: dict[str, Any]
    params: dict[str, Any]
    architectures: dict[str, dict[str, Any]] = field(default_factory=dict)
    state_dicts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    history: dict[str, np.ndarray] = field(default_factory=dict)
    graphs: dict[tuple[str, str], GraphRecord] = field(default_factory=dict)
    parity: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def graph(self, kind: str, model: str) -> GraphRecord:
        try:
            return self.graphs[(kind, model)]
        except KeyError:
            have = ", ".join(f"{k}/{m}" for k, m in sorted(self.graphs)) or "none"
            raise BundleFormatError(
                f"The bundle {self.path} has no {kind} graph for {model} (graphs present: {have}). "
                f"Add graphs with: ptycho-export {self.path}"
            ) from None


def _open_h5(path: Path) -> h5py.File:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(8)
    except IsADirectoryError:
        raise BundleFormatError(f"{path} is a folder without {BUNDLE_FILENAME}.") from None
    if magic != b"\x89HDF\r\n\x1a\n":
        kind = "a zip archive (a PtychoPINN/dill bundle?)" if magic[:2] == b"PK" else "not an HDF5 file"
        raise BundleFormatError(
            f"{path} is {kind}, not a ptycho-export bundle. Bundles are HDF5 files written by "
            "save_torch_bundle (ptycho-export train writes <output-dir>/wts.h5)."
        )
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise BundleFormatError(
            f"{path} starts like an HDF5 file but cannot be opened ({exc}); it is probably truncated "
            "or damaged. Copy it again from its source."
        ) from None


def check_header(f: h5py.File, path: Path) -> dict[str, Any]:
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT_NAME:
        raise BundleFormatError(
            f"{path} is an HDF5 file but not a ptycho-export bundle (root attribute 'format' is "
            f"{fmt!r}, expected {FORMAT_NAME!r})."
        )
    version = f.attrs.get("format_version")
    if version is None or int(version) < 1:
        raise BundleFormatError(f"{path} has no valid 'format_version' attribute.")
    if int(version) > FORMAT_VERSION:
        raise BundleFormatError(
            f"{path} uses bundle format version {int(version)}; this package reads format version "
            f"{FORMAT_VERSION} and older. Upgrade ptycho-runtime / ptycho-export to read it."
        )
    return {k: (v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v)
            for k, v in f.attrs.items()}


def read_bundle(path: str | os.PathLike) -> BundleContents:
    """Open, validate and checksum-verify a bundle; return its contents in memory.

    Every dataset is verified before anything is interpreted, so graph bytes
    never reach onnxruntime or torch.jit unless they are exactly what was
    written.
    """
    p = resolve_bundle_path(path)
    f = _open_h5(p)
    try:
        header = check_header(f, p)
        try:
            return _read_verified(f, p, header)
        except (KeyError, OSError, RuntimeError) as exc:
            raise BundleFormatError(
                f"{p} is damaged or incomplete: {exc}. Copy it again from its source or re-export it."
            ) from None
    finally:
        f.close()


def _read_verified(f: h5py.File, p: Path, header: dict[str, Any]) -> BundleContents:
    if "params" not in f or "config_json" not in f["params"]:
        raise BundleFormatError(f"{p} has no /params/config_json: the params it was trained with are missing.")
    params = json.loads(verify_dataset(f["params/config_json"]))
    for key, ds in f["params"].get("arrays", {}).items():
        params[key] = verify_dataset(ds)
    contents = BundleContents(path=p, header=header, params=params)

    for name, group in f.get("models", {}).items():
        contents.architectures[name] = json.loads(verify_dataset(group["architecture_json"]))
        contents.state_dicts[name] = {k: np.asarray(verify_dataset(ds)) for k, ds in group["state_dict"].items()}
    if "training" in f:
        if "summary_json" in f["training"]:
            contents.training = json.loads(verify_dataset(f["training/summary_json"]))
        for k, ds in f["training"].get("history", {}).items():
            contents.history[k] = np.asarray(verify_dataset(ds))
    for kind, kind_group in f.get("graphs", {}).items():
        for model, g in kind_group.items():
            data = verify_dataset(g["bytes"])
            meta = json.loads(verify_dataset(g["metadata_json"]))
            if meta.get("sha256") not in (None, sha256_hex(data)):
                raise BundleChecksumError(f"Graph {kind}/{model}: bytes do not match the sha256 in its metadata.")
            contents.graphs[(kind, model)] = GraphRecord(kind, model, np.asarray(data).tobytes(), meta)
    for case, g in f.get("parity", {}).items():
        contents.parity[case] = {k: np.asarray(verify_dataset(ds)) for k, ds in g.items()}
    return contents
