"""The safe walk of an HDF5 file: open only a regular file, follow only hard links, plan before reading.

``Policy`` checks every link, object, attribute and declared size against
the schema before any payload byte is read; ``read_plan`` then reads one
planned dataset and verifies its checksum. ``format.reader`` drives it over
the bundle's layout.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import h5py
import numpy as np

from .errors import (
    BundleChecksumError,
    BundleFormatError,
    BundleLimitError,
    BundleNotFoundError,
    BundleUnsafeError,
    fix_damaged,
)
from .schema import (
    BUNDLE_FILENAME,
    CHECKSUM_ATTR,
    FORMAT_NAME,
    FORMAT_VERSION,
    HDF5_MAGIC,
    MAX_ATTR_STRING,
    MAX_ATTRS,
    MAX_CHILDREN,
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
)


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


def open_h5(path: Path) -> tuple[h5py.File, int]:
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
                f"truncated or damaged. {fix_damaged(path)}", path) from None
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
class DatasetPlan:
    ds: h5py.Dataset
    kind: str  # "json" | "array"
    nbytes: int


class Policy:
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
        return BundleFormatError(f"{self.path}: {where} {what}. {fix_damaged(self.path)}", self.path, where)

    def limit(self, where: str, what: str) -> BundleLimitError:
        return BundleLimitError(f"{self.path}: {where} {what}. The bundle is damaged or crafted; "
                                f"{fix_damaged(self.path)}", self.path, where)

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

    def names(self, group: h5py.Group, max_children: int = MAX_CHILDREN) -> list[str]:
        """The link names of ``group`` (their number is checked before they are listed).

        ``max_children``: the group's own limit from the schema; ``MAX_CHILDREN`` for a group without one.
        """
        n = group.id.get_num_objs()
        if n > max_children:
            raise self.limit(group.name, f"holds {n} entries; the format allows at most {max_children}")
        return [raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw) for raw in group.id.__iter__()]

    def children(self, group: h5py.Group, allowed: Optional[Callable[[str], bool]],
                 max_children: int = MAX_CHILDREN, want: str = "dataset") -> dict[str, Any]:
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
        for name in self.names(group, min(len(spec), MAX_CHILDREN)):
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
                ndim: Optional[int] = None) -> DatasetPlan:
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
            if info is None or ds.shape != ():
                raise self.bad(where, f"should be a scalar UTF-8 string (got {dt} {ds.shape})")
            if info.length is not None and info.length > MAX_JSON_BYTES:
                raise self.limit(where, f"is a string of {info.length} bytes; the format allows at most "
                                        f"{MAX_JSON_BYTES}")
            return DatasetPlan(ds, kind, 0)  # a variable-length string lives in the file: bounded by it
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
        return DatasetPlan(ds, kind, nbytes)


# --------------------------------------------------------------------------- reading values


def read_plan(policy: Policy, plan: DatasetPlan) -> Any:
    """Read one planned dataset and verify its checksum (the error never shows hashes or data)."""
    ds, where = plan.ds, plan.ds.name
    expected = scalar_attr(ds, CHECKSUM_ATTR)
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
            f"{fix_damaged(policy.path)}", policy.path, where)
    if plan.kind == "json":
        return _parse_json(policy, where, value)
    return value


def _parse_json(policy: Policy, where: str, raw: bytes) -> Any:
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


def scalar_attr(obj: Any, name: str) -> Any:
    """One scalar attribute, read low-level (None if absent); ``check_attrs`` has checked its type and shape."""
    bname = name.encode()
    if not h5py.h5a.exists(obj.id, bname):
        return None
    aid = h5py.h5a.open(obj.id, bname)
    out = np.empty((), dtype=aid.dtype)
    aid.read(out)
    return out[()]


def attr_value(obj: Any, name: str) -> Any:
    v = scalar_attr(obj, name)
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
    policy = Policy(f, path, 0)
    policy.check_attrs(f, _root_attr)
    fmt = attr_value(f, "format")
    if fmt != FORMAT_NAME:
        shown = fmt if isinstance(fmt, str) and len(fmt) <= 64 else type(fmt).__name__
        raise BundleFormatError(
            f"{path} is an HDF5 file but not a ptycho-export bundle (root attribute 'format' is "
            f"{shown!r}, expected {FORMAT_NAME!r}).", path, "/")
    version = attr_value(f, "format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleFormatError(f"{path} has no valid 'format_version' attribute (an integer >= 1). "
                                f"{fix_damaged(path)}", path, "/")
    if version > FORMAT_VERSION:
        raise BundleFormatError(
            f"{path} uses bundle format version {version}; this package reads format version "
            f"{FORMAT_VERSION} and older. Upgrade ptycho-runtime / ptycho-export to read it.", path, "/")
    return {k: attr_value(f, k) for k in f.attrs if _root_attr(k)}
