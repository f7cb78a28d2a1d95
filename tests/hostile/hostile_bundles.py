"""Hostile and damaged bundles, made from a legitimate one (needs h5py, numpy, onnx; no torch).

``make_cases(legit, out_dir, canary_dir)`` writes one file per case and
returns ``Case`` records: the class of attack, the readers that must refuse it
(the others may load it, because they never interpret the part that was
changed, but must never raise anything but a ``BundleError``), and the
canary files the case points at. Canary files live outside the bundle's
folder; their access time is set to the distant past, so a reader that opens
one is caught by ``canaries_read``.

Consistent re-hashing: an attacker who edits a payload can recompute its
``sha256`` (``_rehash``); those cases show which checks do not rely on
checksums (params ranges, graph metadata vs params, the parity self-test).

Usage: ``python tests/hostile/hostile_bundles.py LEGIT.h5 OUT_DIR`` writes the cases
(for exploring them by hand).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

FORMAT_NAME = "ptycho-export-bundle"  # the root attribute every reader checks first (format.schema)
CANARY_TOKEN = b"CANARY-7f3c9e-outside-the-bundle\n"
OLD_ATIME = 946684800  # 2000-01-01: any read after this updates atime on relatime mounts

# readers, by name (the harness in test_hostile.py maps them to calls)
READ = "read_bundle"            # ptycho_runtime.format.read_bundle
LOAD = "load_bundle"            # ptycho_runtime.load_bundle (onnx, self-test)
LOAD_TS = "load_bundle_ts"      # ptycho_runtime.load_bundle(backend="torchscript")
TORCH = "load_torch_bundle"     # ptycho_export.load_torch_bundle
INFO = "runtime_info"           # ptycho-runtime info
INSPECT = "export_inspect"      # ptycho-export inspect
VERIFY = "export_verify"        # ptycho-export verify
FILE_READERS = (READ, LOAD, LOAD_TS, TORCH, INFO, INSPECT, VERIFY)  # every reader refuses a bad file
SESSION_READERS = (LOAD, INFO, VERIFY)  # readers that hand ONNX bytes to onnxruntime
TS_READERS = (LOAD_TS, VERIFY)  # readers that hand TorchScript bytes to torch
SELF_TEST_READERS = (LOAD, LOAD_TS, INFO, VERIFY)  # readers that re-run the parity cases


@dataclass
class Case:
    name: str
    cls: str
    path: Path
    must_reject: tuple[str, ...]
    canaries: list[Path] = field(default_factory=list)
    cwd: Path | None = None  # working directory for the readers (ONNX external data is relative to it)


# --------------------------------------------------------------------------- helpers


def _sha(value) -> str:
    if isinstance(value, str):
        return hashlib.sha256(value.encode()).hexdigest()
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()


def _rehash(f: h5py.File, name: str) -> None:
    """Recompute a dataset's sha256 the way the writer does (a consistent attacker)."""
    ds = f[name]
    v = ds[()]
    if isinstance(v, bytes) and h5py.check_string_dtype(ds.dtype) is not None:
        v = v.decode()
    ds.attrs["sha256"] = _sha(v)


def _replace(f: h5py.File, name: str, **kwargs) -> h5py.Dataset:
    if name in f:
        del f[name]
    ds = f.create_dataset(name, **kwargs)
    return ds


def _set_json(f: h5py.File, name: str, value) -> None:
    text = value if isinstance(value, str) else json.dumps(value)
    _replace(f, name, data=text, dtype=h5py.string_dtype("utf-8"))
    f[name].attrs["sha256"] = _sha(text)


def _edit_params(f: h5py.File, **changes) -> None:
    params = json.loads(f["params/config_json"][()].decode())
    params.update(changes)
    _set_json(f, "params/config_json", params)


def _set_graph(f: h5py.File, kind: str, model: str, data: bytes) -> None:
    """Replace graph bytes, re-hashing them and the metadata's sha256 (consistent)."""
    name = f"graphs/{kind}/{model}/bytes"
    _replace(f, name, data=np.frombuffer(data, np.uint8))
    f[name].attrs["sha256"] = _sha(data)
    meta = json.loads(f[f"graphs/{kind}/{model}/metadata_json"][()].decode())
    meta["sha256"] = _sha(data)
    _set_json(f, f"graphs/{kind}/{model}/metadata_json", meta)


def make_canary(folder: Path, name: str, size: int = 4096) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    data = (CANARY_TOKEN * (size // len(CANARY_TOKEN) + 1))[:size]
    path.write_bytes(data)
    reset_canaries([path])
    return path


def reset_canaries(paths) -> None:
    for p in paths:
        if Path(p).is_file():
            os.utime(p, (OLD_ATIME, Path(p).stat().st_mtime))


def canaries_read(paths) -> list[Path]:
    """Canary files whose access time moved: some reader opened and read them."""
    return [Path(p) for p in paths if Path(p).is_file() and Path(p).stat().st_atime > OLD_ATIME + 1]


# --------------------------------------------------------------------------- ONNX and TorchScript surgery


def _onnx_variant(data: bytes, how: str, canary_name: str = "") -> bytes:
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load_from_string(data)
    g = m.graph
    if how == "external_data":
        t = g.initializer[0]
        t.ClearField("raw_data")
        del t.float_data[:]
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", canary_name), ("offset", "0"), ("length", "16")):
            e = t.external_data.add()
            e.key, e.value = k, v
    elif how == "custom_domain":
        out = g.output[0].name
        node = helper.make_node("Evil", [out + "_pre"], [out], domain="com.evil")
        for n in g.node:
            for i, o in enumerate(n.output):
                if o == out:
                    n.output[i] = out + "_pre"
        g.node.append(node)
        m.opset_import.append(helper.make_opsetid("com.evil", 1))
    elif how == "loop":
        # an (unused) Loop with 2^62 iterations: onnxruntime would spin on it
        body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
                                 [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                                  helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
                                 [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])])
        g.initializer.extend([helper.make_tensor("trip", TensorProto.INT64, [], [2**62]),
                              helper.make_tensor("cond", TensorProto.BOOL, [], [True])])
        g.node.insert(0, helper.make_node("Loop", ["trip", "cond"], ["loop_out"], body=body))
    elif how == "wrong_io":
        g.input[0].type.tensor_type.shape.dim[2].dim_value = 32
    elif how in ("expand_bomb", "batch_cubed", "shape_from_data", "batch_lookup"):
        _grow_a_side_tensor(g, how)
    return m.SerializeToString()


def _grow_a_side_tensor(g, how: str) -> None:
    """Outputs unchanged (parity passes), but a tensor on the way is huge: onnxruntime would allocate it.

    expand_bomb: the first output, expanded 2^16-fold and summed back (3.2 GB at the parity batch of 3);
    batch_cubed: a zero added from a [B, B, B, 64, 64] tensor (1 GB at batch 64, 1.1 PB at 4096);
    shape_from_data: a zero added from a tensor whose shape is computed from the data (harmless here, but a
    size no check can bound before the graph runs);
    batch_lookup: a zero added from a [1, table[B]] tensor, the table 1 everywhere but 10^8 at batch 37 (a size
    that jumps at one batch, so inference at two batches cannot see it).
    """
    from onnx import TensorProto, helper

    out = g.output[0].name
    for n in g.node:
        for i, o in enumerate(n.output):
            if o == out:
                n.output[i] = out + "_pre"
    K = 1 << 16
    const = [helper.make_tensor("k_axes", TensorProto.INT64, [1], [-1]),
             helper.make_tensor("k_one", TensorProto.FLOAT, [], [1.0]),
             helper.make_tensor("k_zero", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("k_K", TensorProto.FLOAT, [], [float(K)]),
             helper.make_tensor("k_shape", TensorProto.INT64, [5], [1, 1, 1, 1, K]),
             helper.make_tensor("k_idx", TensorProto.INT64, [1], [0]),
             helper.make_tensor("k_tail", TensorProto.INT64, [2], [64, 64]),
             helper.make_tensor("k_ones2", TensorProto.INT64, [2], [1, 1])]
    g.initializer.extend(const)
    make = helper.make_node
    if how == "expand_bomb":
        nodes = [make("Unsqueeze", [out + "_pre", "k_axes"], ["u"]), make("Expand", ["u", "k_shape"], ["e"]),
                 make("ReduceSum", ["e", "k_axes"], ["r"], keepdims=0), make("Div", ["r", "k_K"], [out])]
    else:
        if how == "batch_cubed":
            nodes = [make("Shape", [g.input[0].name], ["s"]), make("Gather", ["s", "k_idx"], ["b"]),
                     make("Concat", ["b", "b", "b", "k_tail"], ["big_shape"], axis=0)]
        elif how == "batch_lookup":
            table = [1] * 4097
            table[37] = 10**8
            g.initializer.extend([helper.make_tensor("k_table", TensorProto.INT64, [4097], table),
                                  helper.make_tensor("k_one_i", TensorProto.INT64, [1], [1])])
            nodes = [make("Shape", [g.input[0].name], ["s"]), make("Gather", ["s", "k_idx"], ["b"]),
                     make("Gather", ["k_table", "b"], ["size"]),
                     make("Concat", ["k_one_i", "size"], ["big_shape"], axis=0)]
        else:
            nodes = [make("ReduceSum", [out + "_pre"], ["total"], keepdims=0),
                     make("Mul", ["total", "k_zero"], ["nothing"]), make("Cast", ["nothing"], ["n"], to=7),
                     make("Add", ["n", "k_ones2"], ["big_shape"])]
        nodes += [make("Expand", ["k_one", "big_shape"], ["e"]), make("ReduceSum", ["e"], ["r"], keepdims=0),
                  make("Mul", ["r", "k_zero"], ["z"]), make("Add", [out + "_pre", "z"], [out])]
    g.node.extend(nodes)


def _zip_replace(data: bytes, member_suffix: str, new: bytes | None, compress: int = zipfile.ZIP_STORED,
                 extra: list[tuple[str, bytes, int]] = ()) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            payload = src.read(info)
            if info.filename.endswith(member_suffix) and new is not None:
                payload = new
                dst.writestr(zipfile.ZipInfo(info.filename), payload, compress_type=compress)
            else:
                dst.writestr(info, payload)
        for name, payload, ctype in extra:
            dst.writestr(zipfile.ZipInfo(name), payload, compress_type=ctype)
    return buf.getvalue()


EVIL_PICKLE = b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
EVIL_STACK_GLOBAL = b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."


# --------------------------------------------------------------------------- the cases


def make_cases(legit: Path, out_dir: Path, canary_dir: Path) -> list[Case]:
    """Write every hostile case under ``out_dir`` (canaries under ``canary_dir``, outside it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    canary = make_canary(canary_dir, "canary.bin", 1 << 16)
    canary_h5 = canary_dir / "canary.h5"
    with h5py.File(canary_h5, "w") as f:
        f.create_dataset("x", data=np.frombuffer(CANARY_TOKEN * 64, np.uint8))
        f["x"].attrs["sha256"] = _sha(CANARY_TOKEN * 64)
    reset_canaries([canary_h5])
    onnx_cwd = out_dir / "onnx_cwd"
    onnx_cwd.mkdir(exist_ok=True)
    onnx_canary = make_canary(onnx_cwd, "weights.bin")
    cases: list[Case] = []

    with h5py.File(legit, "r") as f:
        params = json.loads(f["params/config_json"][()].decode())
        N = params["N"]
        has_graphs = "graphs" in f
        d2o_onnx = f["graphs/onnx/diffraction_to_obj/bytes"][()].tobytes() if has_graphs else b""
        d2o_ts = f["graphs/torchscript/diffraction_to_obj/bytes"][()].tobytes() if has_graphs else b""
        weight_name = sorted(f["models/diffraction_to_obj/state_dict"])[0]

    def case(name: str, cls: str, edit: Callable[[h5py.File], None] | None, must=FILE_READERS,
             canaries=(), cwd=None) -> None:
        path = out_dir / f"{name}.h5"
        shutil.copyfile(legit, path)
        if edit is not None:
            with h5py.File(path, "r+") as f:
                edit(f)
        cases.append(Case(name, cls, path, tuple(must), [Path(c) for c in canaries], cwd))

    # ---- links
    case("external_link_params", "links",
         lambda f: (f.__delitem__("params/config_json"),
                    f.__setitem__("params/config_json", h5py.ExternalLink(str(canary_h5), "/x"))),
         canaries=[canary_h5])
    case("external_link_group", "links",
         lambda f: (f.__delitem__("training"), f.__setitem__("training", h5py.ExternalLink(str(canary_h5), "/"))),
         canaries=[canary_h5])
    case("soft_link_probe", "links",
         lambda f: (f.__delitem__("params/arrays/probe"),
                    f.__setitem__("params/arrays/probe", h5py.SoftLink("/parity/b1/input.amplitude"))))
    case("hard_link_cycle", "links", lambda f: f["models/autoencoder"].__setitem__("loop", f["models"]))

    # ---- external raw storage (the /etc/passwd attack, with a matching checksum)
    def external_probe(f):
        n = N * N * 8
        _replace(f, "params/arrays/probe", shape=(N, N), dtype=np.complex64, external=[(str(canary), 0, n)])
        f["params/arrays/probe"].attrs["sha256"] = hashlib.sha256(canary.read_bytes()[:n]).hexdigest()

    case("external_storage_probe", "external", external_probe, canaries=[canary])

    def external_history(target):
        def edit(f):
            _replace(f, "training/history/loss", shape=(1,), dtype=np.float64, external=[(target, 0, 8)])
            f["training/history/loss"].attrs["sha256"] = "0" * 64
        return edit

    case("external_storage_canary", "external", external_history(str(canary)), canaries=[canary])
    case("external_storage_devzero", "external", external_history("/dev/zero"))
    fifo = canary_dir / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    case("external_storage_fifo", "external", external_history(str(fifo)))

    # ---- virtual datasets
    def vds(f):
        layout = h5py.VirtualLayout(shape=(64,), dtype=np.uint8)
        layout[:] = h5py.VirtualSource(str(canary_h5), "x", shape=(64 * len(CANARY_TOKEN),))[:64]
        del f["training/history/loss"]
        f.create_virtual_dataset("training/history/loss", layout)
        f["training/history/loss"].attrs["sha256"] = "0" * 64

    case("virtual_dataset", "vds", vds, canaries=[canary_h5])

    # ---- shape bombs (declared sizes far beyond the bytes stored) and gzip bombs
    def shape_bomb(name, shape, dtype):
        def edit(f):
            _replace(f, name, shape=shape, dtype=dtype, chunks=(1 << 20,) + (1,) * (len(shape) - 1))
            f[name].attrs["sha256"] = "0" * 64
        return edit

    case("shape_bomb_weight", "bombs", shape_bomb(f"models/diffraction_to_obj/state_dict/{weight_name}",
                                                  (10**10,), np.float32))
    case("shape_bomb_history", "bombs", shape_bomb("training/history/loss", (10**12,), np.float64))
    case("shape_bomb_parity", "bombs", shape_bomb("parity/b3/input.amplitude", (10**9, 1, N, N), np.float32))

    def gzip_bomb(name, nbytes):
        def edit(f):
            zeros = np.zeros(nbytes, np.uint8)
            _replace(f, name, data=zeros, chunks=(1 << 22,), compression="gzip", compression_opts=9)
            f[name].attrs["sha256"] = _sha(zeros)
        return edit

    if has_graphs:
        case("gzip_bomb_graph", "bombs", gzip_bomb("graphs/onnx/diffraction_to_obj/bytes", 256 * 2**20))

    def overlap(f):  # a dataset that claims more bytes than the file holds
        n = os.path.getsize(legit) // 8 + 1
        _replace(f, "training/history/val_loss", data=np.zeros(n))
    case("declared_beyond_limit", "bombs", overlap)

    # ---- wrong types, dtypes and shapes in attributes and datasets
    attr_edits = {
        "format_version_float": ("format_version", 1.9),
        "format_version_string": ("format_version", "1"),
        "format_version_array": ("format_version", np.array([1, 1])),
        "format_version_huge": ("format_version", 2**40),
        "format_int": ("format", 7),
        "format_long_string": ("format", "x" * 100_000),
    }
    for name, (key, value) in attr_edits.items():
        case(name, "attributes", lambda f, k=key, v=value: f.attrs.__setitem__(k, v))
    case("sha256_int", "attributes", lambda f: f["params/config_json"].attrs.__setitem__("sha256", 5))
    case("sha256_array", "attributes",
         lambda f: f["params/config_json"].attrs.__setitem__("sha256", np.zeros((100, 100), np.uint8)))
    case("sha256_missing", "attributes", lambda f: f["params/config_json"].attrs.__delitem__("sha256"))
    case("n_parameters_string", "attributes",
         lambda f: f["models/autoencoder"].attrs.__setitem__("n_parameters", "many"), must=())

    def dataset_dtype(name, data):
        def edit(f):
            _replace(f, name, data=data)
            f[name].attrs["sha256"] = _sha(data)
        return edit

    case("config_json_int_array", "dtypes", dataset_dtype("params/config_json", np.arange(5)))
    case("probe_real", "dtypes", dataset_dtype("params/arrays/probe", np.ones((N, N), np.float32)))
    case("probe_wrong_shape", "dtypes", dataset_dtype("params/arrays/probe", np.ones((N // 2, N // 2), np.complex64)))
    case("weight_compound", "dtypes", dataset_dtype(f"models/diffraction_to_obj/state_dict/{weight_name}",
                                                    np.zeros(4, dtype=[("a", "f4"), ("b", "i4")])))
    case("weight_wrong_shape", "dtypes", dataset_dtype(f"models/diffraction_to_obj/state_dict/{weight_name}",
                                                       np.zeros((3, 3), np.float32)),
         must=(TORCH, VERIFY))
    case("parity_float64", "dtypes", dataset_dtype("parity/b1/input.amplitude", np.zeros((1, 1, N, N))))
    case("unknown_object", "dtypes", lambda f: f.create_dataset("models/diffraction_to_obj/extra", data=1))
    case("config_json_not_utf8", "dtypes", lambda f: (
        _replace(f, "params/config_json", data=np.void(b"\xff\xfe{")),))
    if has_graphs:
        case("graph_bytes_float", "dtypes", dataset_dtype("graphs/onnx/diffraction_to_obj/bytes",
                                                          np.zeros(16, np.float32)))

    # ---- params out of range (consistently re-hashed: checksums prove nothing here)
    bad_params = {
        "N_zero": {"N": 0}, "N_100": {"N": 100}, "N_string": {"N": "64"}, "N_float": {"N": 64.0},
        "gridsize_zero": {"gridsize": 0}, "gridsize_huge": {"gridsize": 1000},
        "scale_nan": {"intensity_scale": float("nan")}, "scale_inf": {"intensity_scale": float("inf")},
        "scale_zero": {"intensity_scale": 0.0}, "scale_negative": {"intensity_scale": -1.0},
        "scale_string": {"intensity_scale": "big"}, "output_mode_unknown": {"output_mode": "sideways"},
        "n_filters_scale_huge": {"n_filters_scale": 10**6},
    }
    for name, changes in bad_params.items():
        case(f"params_{name}", "params", lambda f, c=changes: _edit_params(f, **c))
    case("params_not_object", "params", lambda f: _set_json(f, "params/config_json", [1, 2, 3]))
    case("params_invalid_json", "params", lambda f: _set_json(f, "params/config_json", "{not json"))
    case("params_deep_json", "params", lambda f: _set_json(f, "params/config_json", "[" * 100_000 + "]" * 100_000))
    case("params_big_json", "params", lambda f: _set_json(f, "params/config_json",
                                                          json.dumps({"pad": "x" * (5 * 2**20), **params})))
    case("shadow_N", "shadowing", lambda f: dataset_dtype("params/arrays/N", np.array(128))(f))
    case("shadow_scale", "shadowing",
         lambda f: dataset_dtype("params/arrays/intensity_scale", np.array([1.0, 2.0]))(f))

    # ---- graphs: metadata vs params, ONNX content, TorchScript archives
    if has_graphs:
        def meta_edit(kind, **changes):
            def edit(f):
                name = f"graphs/{kind}/diffraction_to_obj/metadata_json"
                meta = json.loads(f[name][()].decode())
                meta.update(changes)
                _set_json(f, name, meta)
            return edit

        case("graph_meta_wrong_io", "graphs", meta_edit("onnx", inputs=[{"name": "x", "shape": [1], "dtype": "int8"}]))
        case("graph_meta_not_object", "graphs", lambda f: _set_json(f, "graphs/onnx/diffraction_to_obj/metadata_json",
                                                                      "[]"))
        case("onnx_external_data", "onnx", lambda f: _set_graph(
            f, "onnx", "diffraction_to_obj", _onnx_variant(d2o_onnx, "external_data", onnx_canary.name)),
             must=SESSION_READERS, canaries=[onnx_canary], cwd=onnx_cwd)
        case("onnx_custom_domain", "onnx", lambda f: _set_graph(
            f, "onnx", "diffraction_to_obj", _onnx_variant(d2o_onnx, "custom_domain")), must=SESSION_READERS)
        case("onnx_loop", "onnx", lambda f: _set_graph(
            f, "onnx", "diffraction_to_obj", _onnx_variant(d2o_onnx, "loop")), must=SESSION_READERS)
        case("onnx_wrong_io", "onnx", lambda f: _set_graph(
            f, "onnx", "diffraction_to_obj", _onnx_variant(d2o_onnx, "wrong_io")), must=SESSION_READERS)
        for how in ("expand_bomb", "batch_cubed", "shape_from_data", "batch_lookup"):
            case(f"onnx_{how}", "onnx", lambda f, how=how: _set_graph(
                f, "onnx", "diffraction_to_obj", _onnx_variant(d2o_onnx, how)), must=SESSION_READERS)
        case("onnx_garbage", "onnx", lambda f: _set_graph(f, "onnx", "diffraction_to_obj", os.urandom(4096)),
             must=SESSION_READERS)
        case("torchscript_evil_pickle", "torchscript", lambda f: _set_graph(
            f, "torchscript", "diffraction_to_obj", _zip_replace(d2o_ts, "data.pkl", EVIL_PICKLE)), must=TS_READERS)
        case("torchscript_evil_stack_global", "torchscript", lambda f: _set_graph(
            f, "torchscript", "diffraction_to_obj", _zip_replace(d2o_ts, "constants.pkl", EVIL_STACK_GLOBAL)),
             must=TS_READERS)
        case("torchscript_compressed_pickle", "torchscript", lambda f: _set_graph(
            f, "torchscript", "diffraction_to_obj",
            _zip_replace(d2o_ts, "data.pkl", zipfile.ZipFile(io.BytesIO(d2o_ts)).read(
                [n for n in zipfile.ZipFile(io.BytesIO(d2o_ts)).namelist() if n.endswith("data.pkl")][0]),
                compress=zipfile.ZIP_DEFLATED)), must=TS_READERS)
        case("torchscript_zip_bomb", "torchscript", lambda f: _set_graph(
            f, "torchscript", "diffraction_to_obj",
            _zip_replace(d2o_ts, "", None, extra=[("archive/code/bomb.py", b"\0" * (64 * 2**20),
                                                   zipfile.ZIP_DEFLATED)])), must=TS_READERS)
        case("torchscript_not_zip", "torchscript", lambda f: _set_graph(
            f, "torchscript", "diffraction_to_obj", b"PK\x03\x04" + os.urandom(2000)), must=TS_READERS)

    # ---- consistent re-hashing: every checksum right, contents wrong
    def scale_x2(f, with_contract: bool):
        s = json.loads(f["params/config_json"][()].decode())["intensity_scale"] * 2
        _edit_params(f, intensity_scale=s)
        if with_contract and "graphs" in f:
            for kind in f["graphs"]:
                for model in f["graphs"][kind]:
                    name = f"graphs/{kind}/{model}/metadata_json"
                    meta = json.loads(f[name][()].decode())
                    meta["contract"]["intensity_scale"] = s
                    _set_json(f, name, meta)

    case("rehash_scale_x2_params_only", "rehash", lambda f: scale_x2(f, False), must=SESSION_READERS + TS_READERS)
    if has_graphs:
        case("rehash_scale_x2_everywhere", "rehash", lambda f: scale_x2(f, True), must=SELF_TEST_READERS)

        def parity_tamper(f):
            name = "parity/b1/diffraction_to_obj.object_real"  # the case the load-time self-test runs
            _replace(f, name, data=np.zeros((1, params["gridsize"] ** 2, N, N), np.float32))
            _rehash(f, name)

        case("rehash_parity_zeroed", "rehash", parity_tamper, must=SELF_TEST_READERS)

    # ---- damage without re-hashing (must stay a checksum error that shows no hash)
    def bitflip(f):
        name = "graphs/onnx/diffraction_to_obj/bytes" if has_graphs else "params/arrays/probe"
        ds = f[name]
        arr = ds[()]
        arr.view(np.uint8)[len(arr.view(np.uint8)) // 2] ^= 0x10
        ds[...] = arr

    case("bitflip_unhashed", "checksum", bitflip)

    # ---- damaged HDF5 metadata that makes libhdf5 itself loop (found by fuzzing a format-1 bundle): the root
    # format attribute as a variable-length string (format 1 stores every string so, in the unchecksummed
    # global heap), its heap object's header (index, references, reserved, size) zeroed
    heap_loop = out_dir / "global_heap_loop.h5"
    shutil.copyfile(legit, heap_loop)
    with h5py.File(heap_loop, "r+") as f:
        del f.attrs["format"]
        f.attrs["format"] = FORMAT_NAME
    raw = bytearray(heap_loop.read_bytes())
    at = raw.find(struct.pack("<Q", len(FORMAT_NAME)) + FORMAT_NAME.encode())
    assert at >= 8, "no global-heap object holds the format name"
    raw[at - 8:at + 8] = bytes(16)
    heap_loop.write_bytes(raw)
    cases.append(Case("global_heap_loop", "metadata", heap_loop, FILE_READERS))

    # ---- not a regular file (made here; the harness passes their paths)
    fifo_bundle = out_dir / "fifo_bundle.h5"
    if not fifo_bundle.exists():
        os.mkfifo(fifo_bundle)
    cases.append(Case("bundle_is_fifo", "fifo", fifo_bundle, FILE_READERS))
    cases.append(Case("bundle_is_device", "fifo", Path("/dev/zero"), FILE_READERS))
    return cases


if __name__ == "__main__":
    for c in make_cases(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[2]) / "canaries"):
        print(f"{c.cls:12} {c.name:36} {c.path}")
