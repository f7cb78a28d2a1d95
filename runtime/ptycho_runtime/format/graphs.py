"""Compiled graphs checked before a deserializer sees them: ONNX op by op, TorchScript archives by structure."""

from __future__ import annotations

import io
import pickletools
import zipfile
from typing import Any, Callable, Mapping

from .checks import graph_io, short
from .errors import BundleError, BundleFormatError, BundleParamsError, BundleUnsafeError, fix_damaged
from .graph_sizes import check_onnx_sizes
from .schema import (
    MAX_ZIP_ENTRIES,
    ONNX_ALLOWED_DOMAINS,
    ONNX_ALLOWED_OPS,
    ONNX_ELEM_FLOAT,
    TORCHSCRIPT_PICKLE_GLOBALS,
)


def check_onnx_graph(data: bytes, kind_model: tuple[str, str], params: Mapping[str, Any], path: Any = None
                     ) -> None:
    """Parse an ONNX model's protobuf and refuse what our exporter never writes, before onnxruntime sees it.

    Refused: external-data tensors (onnxruntime would open files relative to
    the working directory), functions, training info, operator domains other
    than the standard one, ops outside ``ONNX_ALLOWED_OPS`` (no Loop, Scan,
    If: no unbounded control flow), attributes holding subgraphs, tensors that
    could outgrow the model (``graph_sizes``), and inputs/outputs whose names,
    element types or shapes differ from what the params require (``graph_io``).
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
        raise BundleFormatError(f"{path}: {where} is not a valid ONNX model. {fix_damaged(path)}", path,
                                where) from None
    if len(m.functions) or len(m.training_info):
        raise unsafe("defines functions or training steps")
    for opset in m.opset_import:
        if opset.domain not in ONNX_ALLOWED_DOMAINS:
            raise unsafe(f"imports the operator domain {short(opset.domain)}")
    g = m.graph

    def check_tensor(t: Any) -> None:
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            raise unsafe(f"stores tensor {short(t.name)} as external data (a file outside the bundle)")

    for t in g.initializer:
        check_tensor(t)
    if len(g.sparse_initializer):
        raise unsafe("has sparse initializers")
    for node in g.node:
        if node.domain not in ONNX_ALLOWED_DOMAINS:
            raise unsafe(f"uses an operator of domain {short(node.domain)}")
        if node.op_type not in ONNX_ALLOWED_OPS:
            raise unsafe(f"uses the operator {short(node.op_type)}, which is not on the allow-list")
        for a in node.attribute:
            if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) or a.HasField("g") or len(a.graphs):
                raise unsafe(f"has a subgraph in node {short(node.name)}")
            if a.HasField("t"):
                check_tensor(a.t)
            for t in a.tensors:
                check_tensor(t)
            if a.HasField("sparse_tensor") or len(a.sparse_tensors):
                raise unsafe("has sparse tensor attributes")
    check_onnx_sizes(m, params, unsafe)
    inputs, outputs = graph_io("onnx", model, params)
    init_names = {t.name for t in g.initializer}
    for label, declared, expected in (("inputs", [v for v in g.input if v.name not in init_names], inputs),
                                      ("outputs", list(g.output), outputs)):
        got = [_value_info(v) for v in declared]
        want = [(e["name"], ONNX_ELEM_FLOAT, e["shape"]) for e in expected]
        if got != want:
            raise BundleParamsError(
                f"{path}: the ONNX graph {where} declares {label} {short(got)}; the params (N, gridsize, "
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
        raise BundleFormatError(f"{path}: {where} is not a TorchScript archive. {fix_damaged(path)}", path,
                                where) from None
    if len(infos) > MAX_ZIP_ENTRIES:
        raise unsafe(f"has {len(infos)} entries")
    total = 0
    for info in infos:
        name = info.filename
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise unsafe(f"has an entry named {short(name)}")
        if info.compress_type != zipfile.ZIP_STORED and not (
                info.compress_type == zipfile.ZIP_DEFLATED and "/code/" in f"/{name}"):
            raise unsafe(f"has a compressed entry {short(name)} (torch compresses only code)")
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
        raise BundleFormatError(f"{path}: {where} holds a malformed pickle or zip entry. {fix_damaged(path)}",
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
            raise unsafe(f"has a pickle ({name}) that names {short(target)}")
        strings = []
