"""How the bundle-parsing process hands its result back: frames of JSON and raw array bytes, never a pickle.

``format.isolated`` runs libhdf5 over a stranger's file in a child process
(``format.parser_process``). What comes back crossed from a process that parsed
hostile bytes, so it is decoded as data only: one length-prefixed JSON
header, then each array's raw bytes. Every container in the header is tagged
(``["D", pairs]``, ``["L", items]``, ``["A", index]``, ``["B", index]``), so
no JSON text inside a bundle can pose as an array reference; dtypes, shapes
and the total size are checked before anything is allocated.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import errors
from .contents import BundleContents, GraphRecord

MAX_HEADER_BYTES = 256 * 2**20      # the JSON documents are ≤ 4 MiB each (schema.MAX_JSON_BYTES); a few of them
MAX_ARRAY_NDIM = 8
_LENGTH = struct.Struct("<Q")
_FIELDS = ("header", "params", "architectures", "state_dicts", "training", "history", "parity", "n_parameters",
           "file_size", "physics")


class WireError(Exception):
    """The frame is not what the protocol allows (a crashed or compromised worker); never leaves ``format``."""


def encode_contents(contents: BundleContents) -> tuple[dict[str, Any], list[np.ndarray]]:
    """``contents`` → (JSON-able header, arrays in the order their bytes follow)."""
    arrays: list[np.ndarray] = []
    body = {name: _encode(getattr(contents, name), arrays) for name in _FIELDS}
    body["graphs"] = [[kind, model, _encode(rec.data, arrays), _encode(rec.metadata, arrays)]
                      for (kind, model), rec in contents.graphs.items()]
    return body, arrays


def decode_contents(body: Any, arrays: list[np.ndarray], path: Path) -> BundleContents:
    """The inverse of ``encode_contents``; ``path`` is the caller's own (resolved) path, not the worker's."""
    if not isinstance(body, dict) or set(body) != {*_FIELDS, "graphs"} or not isinstance(body["graphs"], list):
        raise WireError("the contents frame does not have the bundle's fields")
    used: set[int] = set()
    values = {name: _decode(body[name], arrays, used) for name in _FIELDS}
    contents = BundleContents(path=path, **values)
    for entry in body["graphs"]:
        if not (isinstance(entry, list) and len(entry) == 4 and all(isinstance(x, str) for x in entry[:2])):
            raise WireError("a graph entry is malformed")
        data, metadata = _decode(entry[2], arrays, used), _decode(entry[3], arrays, used)
        if not isinstance(data, bytes) or not isinstance(metadata, dict):
            raise WireError("a graph entry is malformed")
        contents.graphs[(entry[0], entry[1])] = GraphRecord(entry[0], entry[1], data, metadata)
    return contents


def encode_error(exc: errors.BundleError) -> dict[str, Any]:
    return {"ok": False, "error": type(exc).__name__, "message": str(exc), "path": exc.path, "dataset": exc.dataset}


def decode_error(body: dict[str, Any]) -> errors.BundleError:
    """The worker's ``BundleError``, re-raised in the caller as the same class (unknown names: a format error)."""
    cls = getattr(errors, str(body.get("error")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.BundleError)):
        cls = errors.BundleFormatError
    message, path, dataset = body.get("message"), body.get("path"), body.get("dataset")
    return cls(message if isinstance(message, str) else "The bundle could not be read.",
               path if isinstance(path, str) else None, dataset if isinstance(dataset, str) else None)


# --------------------------------------------------------------------------- frames


def write_frame(out: IO[bytes], header: dict[str, Any], arrays: list[np.ndarray] = ()) -> None:
    """One frame: the header's length and JSON, each array described in it, then their bytes in order."""
    header = {**header, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}
    text = json.dumps(header, separators=(",", ":")).encode()
    out.write(_LENGTH.pack(len(text)) + text)
    for a in arrays:
        out.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    out.flush()


def read_frame(src: IO[bytes], max_array_bytes: int,
               max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Read one frame; ``max_array_bytes`` and ``max_header_bytes`` bound what it may make the reader allocate."""
    (length,) = _LENGTH.unpack(_read_exact(src, _LENGTH.size))
    if length > min(max_header_bytes, MAX_HEADER_BYTES):
        raise WireError(f"a frame header of {length} bytes")
    try:
        header = json.loads(_read_exact(src, length))
    except (ValueError, RecursionError):
        raise WireError("a frame header that is not JSON") from None
    specs = header.get("arrays") if isinstance(header, dict) else None
    if not isinstance(specs, list):
        raise WireError("a frame without its array list")
    parsed = [_array_spec(spec) for spec in specs]
    if sum(int(np.prod(shape, dtype=object)) * dt.itemsize for dt, shape in parsed) > max_array_bytes:
        raise WireError("arrays larger than the file they came from")
    arrays = []
    for dt, shape in parsed:
        a = np.empty(shape, dt)
        _fill(src, memoryview(a.reshape(-1).view(np.uint8)))
        arrays.append(a)
    return header, arrays


def _read_exact(src: IO[bytes], n: int) -> bytes:
    buf = bytearray(n)
    _fill(src, memoryview(buf))
    return bytes(buf)


def _fill(src: IO[bytes], view: memoryview) -> None:
    """Fill ``view`` from ``src`` (a pipe may return fewer bytes per read), or EOFError where the stream ends."""
    got = 0
    while got < len(view):
        n = src.readinto(view[got:])
        if not n:
            raise EOFError
        got += n


def _array_spec(spec: Any) -> tuple[np.dtype, tuple[int, ...]]:
    if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], list)):
        raise WireError("a malformed array description")
    try:
        dt = np.dtype(spec[0])
    except TypeError:
        raise WireError("an unknown dtype") from None
    shape = spec[1]
    if (dt.kind not in "biufc" or dt.fields is not None or dt.subdtype is not None or len(shape) > MAX_ARRAY_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise WireError("an array description outside the format")
    return dt, tuple(shape)


# --------------------------------------------------------------------------- values


def _encode(value: Any, arrays: list[np.ndarray]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray):
        arrays.append(value)
        return ["A", len(arrays) - 1]
    if isinstance(value, (bytes, bytearray)):
        arrays.append(np.frombuffer(bytes(value), np.uint8))
        return ["B", len(arrays) - 1]
    if isinstance(value, np.generic):
        return _encode(value.item(), arrays)
    if isinstance(value, dict):
        return ["D", [[str(k), _encode(v, arrays)] for k, v in value.items()]]
    if isinstance(value, (list, tuple)):
        return ["L", [_encode(v, arrays) for v in value]]
    raise TypeError(f"a reader value of type {type(value).__name__} has no wire form")


def _decode(node: Any, arrays: list[np.ndarray], used: set[int]) -> Any:
    """One value; each array may be referenced once (so a few bytes of JSON cannot copy one a thousand times)."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not (isinstance(node, list) and len(node) == 2 and node[0] in ("A", "B", "D", "L")):
        raise WireError("an untagged container")
    tag, payload = node
    if tag in ("A", "B"):
        if not (isinstance(payload, int) and 0 <= payload < len(arrays)) or payload in used:
            raise WireError("a reference to a missing or already used array")
        used.add(payload)
        return arrays[payload] if tag == "A" else arrays[payload].tobytes()
    if not isinstance(payload, list):
        raise WireError("a malformed container")
    if tag == "L":
        return [_decode(v, arrays, used) for v in payload]
    out: dict[str, Any] = {}
    for pair in payload:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise WireError("a malformed mapping")
        out[pair[0]] = _decode(pair[1], arrays, used)
    return out
