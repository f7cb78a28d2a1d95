"""The writer and the reader of ``bundle_format`` agree: write → read round trip, without torch.

``write_bundle`` and ``write_graphs`` are the only code that names a group path for writing and
``read_bundle`` the only one that reads; this proves they describe the same file, byte for byte,
in the torch-free environment too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ptycho_runtime import format as fmt

N, GRIDSIZE = 64, 2
C = GRIDSIZE**2


def _params(rng: np.random.Generator) -> dict:
    probe = (rng.normal(size=(N, N)) + 1j * rng.normal(size=(N, N))).astype(np.complex64)
    return {"N": N, "gridsize": GRIDSIZE, "intensity_scale": np.float64(12.5), "n_filters_scale": 1,
            "output_mode": "real_imag", "nphotons": 1e6, "nepochs": np.int64(3), "probe": probe,
            "output_prefix": Path("out/run"), "object.big": True, "train_data_file_path": None}


def _models(rng: np.random.Generator) -> dict[str, fmt.ModelRecord]:
    arch = {"N": N, "gridsize": GRIDSIZE, "n_filters_scale": 1, "output_mode": "real_imag", "class": "Fake"}
    out = {}
    for i, name in enumerate(fmt.MODEL_NAMES):
        sd = {"enc.weight": rng.normal(size=(8, C, 3, 3)).astype(np.float32),
              "enc.bias": np.zeros(8, np.float32),
              "scaler.log_scale": np.array(2.5, np.float32),  # 0-d stays 0-d
              "steps": np.array([7 + i], np.int64)}
        out[name] = fmt.ModelRecord(dict(arch), sd, 1000 + i)
    return out


def _graph(params: dict, rng: np.random.Generator) -> tuple[fmt.GraphRecord, dict]:
    inputs, outputs = fmt.graph_io("onnx", "diffraction_to_obj", params)
    data = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    meta = {"inputs": inputs, "outputs": outputs, "opset": fmt.DEFAULT_OPSET, "sha256": fmt.sha256_hex(data),
            "contract": {"intensity_scale": float(params["intensity_scale"])}}
    case = {"input.amplitude": rng.uniform(0, 1, (2, C, N, N)).astype(np.float32),
            "input.offsets": rng.normal(size=(2, C, 1, 2)).astype(np.float32),
            "diffraction_to_obj.real": rng.normal(size=(2, C, N, N)).astype(np.float32)}
    return fmt.GraphRecord("onnx", "diffraction_to_obj", data, meta), {"b2": case}


def test_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    params, models = _params(rng), _models(rng)
    path = fmt.write_bundle(tmp_path / "wts.h5", params, models, producer="round-trip test",
                            versions={"numpy": np.__version__}, training={"epochs_run": 3, "device": "cpu"},
                            history={"loss": [3.0, 2.0, 1.5], "val_loss": np.array([3.5, 2.5, 2.0], np.float32)},
                            physics={"photon_energy_eV": 8800, "detector_distance_m": 2.0, "object_pixel_size_m": None})
    assert path == tmp_path / "wts.h5" and sorted(p.name for p in tmp_path.iterdir()) == ["wts.h5"]

    c = fmt.read_bundle(path)
    assert c.header["format"] == fmt.FORMAT_NAME and c.header["format_version"] == fmt.FORMAT_VERSION
    assert c.header["producer"] == "round-trip test" and c.header["numpy_version"] == np.__version__
    # params: numpy scalars come back as Python numbers, paths as strings, the probe as the same complex array
    assert c.params["intensity_scale"] == 12.5 and type(c.params["intensity_scale"]) is float
    assert c.params["nepochs"] == 3 and type(c.params["nepochs"]) is int
    assert c.params["output_prefix"] == "out/run" and c.params["train_data_file_path"] is None
    assert c.params["object.big"] is True and c.params["output_mode"] == "real_imag"
    np.testing.assert_array_equal(c.params["probe"], params["probe"])
    assert c.params["probe"].dtype == np.complex64
    # models: architecture, every tensor with dtype and shape, the parameter count
    for name, record in models.items():
        assert c.architectures[name] == record.architecture
        assert c.n_parameters[name] == record.n_parameters
        assert set(c.state_dicts[name]) == set(record.state_dict)
        for key, arr in record.state_dict.items():
            got = c.state_dicts[name][key]
            assert got.dtype == arr.dtype and got.shape == arr.shape
            np.testing.assert_array_equal(got, arr)
    assert c.training == {"epochs_run": 3, "device": "cpu"}
    np.testing.assert_array_equal(c.history["loss"], [3.0, 2.0, 1.5])
    assert c.history["val_loss"].dtype == np.float64
    assert c.graphs == {} and c.parity == {}
    assert c.physics == {"photon_energy_eV": 8800.0, "detector_distance_m": 2.0, "object_pixel_size_m": None}

    graph, parity = _graph(c.params, rng)
    fmt.write_graphs(path, [graph], parity)
    c2 = fmt.read_bundle(path)
    rec = c2.graph("onnx", "diffraction_to_obj")
    assert rec.data == graph.data and rec.metadata == graph.metadata
    for key, arr in parity["b2"].items():
        np.testing.assert_array_equal(c2.parity["b2"][key], arr)
    assert c2.n_parameters == c.n_parameters and c2.training == c.training  # the rest is kept
    assert c2.physics == c.physics
    np.testing.assert_array_equal(c2.state_dicts["autoencoder"]["enc.weight"],
                                  models["autoencoder"].state_dict["enc.weight"])
    with pytest.raises(fmt.BundleGraphMissingError, match="no torchscript graph"):
        c2.graph("torchscript", "diffraction_to_obj")

    # graphs of the same kind and model are replaced, parity cases replaced as a whole
    graph2 = fmt.GraphRecord(graph.kind, graph.model, graph.data[::-1],
                             {**graph.metadata, "sha256": fmt.sha256_hex(graph.data[::-1])})
    fmt.write_graphs(path, [graph2], {"b1": {k: v[:1] for k, v in parity["b2"].items()}})
    c3 = fmt.read_bundle(path)
    assert c3.graph("onnx", "diffraction_to_obj").data == graph.data[::-1] and sorted(c3.parity) == ["b1"]


def test_writer_refuses_what_readers_refuse(tmp_path):
    rng = np.random.default_rng(1)
    target = tmp_path / "wts.h5"
    with pytest.raises(fmt.BundleParamsError, match="'N' must be one of 64, 128, 256"):
        fmt.write_bundle(target, {**_params(rng), "N": 100}, _models(rng), "t", {})
    with pytest.raises(fmt.BundleParamsError, match="probe"):
        fmt.write_bundle(target, {**_params(rng), "probe": np.ones((N, N), np.float32)}, _models(rng), "t", {})
    with pytest.raises(fmt.BundleParamsError, match="unknown key"):
        fmt.write_bundle(target, _params(rng), _models(rng), "t", {}, physics={"wavelength_nm": 0.1})
    with pytest.raises(ValueError, match="model names must be among"):
        fmt.write_bundle(target, _params(rng), {"encoder": _models(rng)["autoencoder"]}, "t", {})
    assert not target.exists() and list(tmp_path.iterdir()) == []  # nothing written, no temporary left
    fmt.write_bundle(target, _params(rng), _models(rng), "t", {})
    graph, parity = _graph(_params(rng), rng)
    before = target.read_bytes()
    with pytest.raises(ValueError, match="not part of the bundle format"):
        fmt.write_graphs(target, [fmt.GraphRecord("tflite", graph.model, graph.data, graph.metadata)], parity)
    assert target.read_bytes() == before  # atomic: the failed update left the bundle as it was


def test_split_params():
    scalars, arrays = fmt.split_params({"a": np.float32(1.5), "b": np.array(3), "c": Path("x/y"),
                                        "d": np.arange(3), "e": "s", "f": None})
    assert scalars == {"a": 1.5, "b": 3, "c": "x/y", "e": "s", "f": None}
    assert type(scalars["b"]) is int and list(arrays) == ["d"]


def test_check_bundle_file_fails_fast_on_non_bundles(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a bundle\n")
    with pytest.raises(fmt.BundleFormatError, match="not an HDF5 file"):
        fmt.check_bundle_file(text)
    with pytest.raises(fmt.BundleNotFoundError):
        fmt.check_bundle_file(tmp_path / "missing.h5")
    rng = np.random.default_rng(2)
    path = fmt.write_bundle(tmp_path / "wts.h5", _params(rng), _models(rng), "t", {})
    assert fmt.check_bundle_file(tmp_path) == path  # a folder holding wts.h5


def _edit_params(path: Path, **changes) -> None:
    """Rewrite /params/config_json with ``changes`` and a fresh checksum (a hand edit that knows the format)."""
    import json

    import h5py

    with h5py.File(path, "r+") as f:
        params = json.loads(f["params/config_json"][()])
        params.update(changes)
        fmt.write_json(f["params"], "config_json", params)


@pytest.mark.parametrize("changes, match", [
    ({"amp_activation": "tanh-of-my-own"}, "'amp_activation' must be one of sigmoid, swish"),
    ({"amp_activation": 3}, "'amp_activation' must be one of"),
    ({"output_prefix": "x" * (fmt.MAX_PARAM_STRING + 1)}, "'output_prefix' is a string of 4097 characters"),
    ({"some_list": ["ok", "y" * 100_000]}, "'some_list' is a string of 100000 characters"),
    ({"k" * 5000: 1}, "is a key longer than 4096"),
])
def test_reader_refuses_params_outside_their_allowed_values_and_sizes(tmp_path, changes, match):
    """Unknown activation names and huge strings in params used to load on every reader."""
    rng = np.random.default_rng(3)
    path = fmt.write_bundle(tmp_path / "wts.h5", _params(rng), _models(rng), producer="t", versions={})
    fmt.read_bundle(path)  # loads before the edit
    _edit_params(path, **changes)
    with pytest.raises(fmt.BundleParamsError, match=match) as info:
        fmt.read_bundle(path)
    assert "re-export it with ptycho-export" in str(info.value)  # the fix is named
    with pytest.raises(fmt.BundleParamsError, match=match):  # and the writer refuses them too
        fmt.write_bundle(tmp_path / "again.h5", {**_params(rng), **changes}, _models(rng), producer="t", versions={})


def test_amp_activations_match_the_training_side():
    """format.AMP_ACTIVATIONS is ptycho_export.config.AMP_ACTIVATIONS (read from the source: no torch needed)."""
    import ast

    config = Path(__file__).resolve().parents[2] / "ptycho_export" / "config.py"
    if not config.is_file():
        pytest.skip("ptycho_export's sources are not next to the runtime")
    for node in ast.parse(config.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "AMP_ACTIVATIONS":
            assert tuple(ast.literal_eval(node.value)) == fmt.AMP_ACTIVATIONS
            return
    pytest.fail("ptycho_export/config.py has no AMP_ACTIVATIONS")


def test_max_children_is_enforced_on_groups_without_their_own_limit(tmp_path):
    """MAX_CHILDREN was declared but never enforced: a group the schema gives no limit holds at most MAX_CHILDREN."""
    import h5py

    from ptycho_runtime.format.policy import Policy

    path = tmp_path / "many.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("g")
        for i in range(fmt.MAX_CHILDREN + 1):
            g.create_dataset(f"d{i}", data=np.zeros(1))
        ok = f.create_group("ok")
        for i in range(fmt.MAX_CHILDREN):
            ok.create_dataset(f"d{i}", data=np.zeros(1))
    with h5py.File(path, "r") as f:
        pol = Policy(f, path, path.stat().st_size)
        assert len(pol.children(f["ok"], None)) == fmt.MAX_CHILDREN
        with pytest.raises(fmt.BundleLimitError, match=f"at most {fmt.MAX_CHILDREN}"):
            pol.children(f["g"], None)
        with pytest.raises(fmt.BundleLimitError, match=f"at most {fmt.MAX_CHILDREN}"):
            pol.names(f["g"])


def test_every_declared_limit_is_used_by_the_reading_code():
    """A limit in format.schema that no reader, check or policy uses is a promise the format does not keep."""
    import re

    import ptycho_runtime.format as package

    folder = Path(package.__file__).parent
    code = "".join((folder / f"{m}.py").read_text() for m in ("policy", "reader", "checks", "graphs", "graph_sizes"))
    limits = re.findall(r"^(MAX_[A-Z0-9_]+) = ", (folder / "schema.py").read_text(), re.M)
    unused = [name for name in limits if not re.search(rf"\b{name}\b", code)]
    assert limits and not unused, f"declared but never enforced: {unused}"


def test_format_2_checksums_its_metadata_and_keeps_no_string_in_the_global_heap(tmp_path):
    """Every string is fixed-length (inside its object, checksummed) and the superblock is version 2 or later.

    A variable-length string lives in the global heap, which HDF5 never checksums; damage there made libhdf5 loop.
    """
    import h5py

    rng = np.random.default_rng(4)
    path = fmt.write_bundle(tmp_path / "wts.h5", _params(rng), _models(rng), "t", {"numpy": np.__version__},
                            training={"device": "cpu", "note": "é"}, history={"loss": [1.0]},
                            physics={"photon_energy_eV": 8800})
    graph, parity = _graph(fmt.read_bundle(path).params, rng)
    fmt.write_graphs(path, [graph], parity)
    assert path.read_bytes()[8] >= 2  # superblock version: 2 and 3 carry checksums, 0 and 1 do not
    strings = []

    def check(name: str, obj) -> None:
        kinds = [(f"{name}@{key}", obj.attrs.get_id(key).dtype) for key in obj.attrs]
        if isinstance(obj, h5py.Dataset):
            kinds.append((name, obj.dtype))
        for where, dt in kinds:
            info = h5py.check_string_dtype(dt)
            if info is not None:
                strings.append(where)
                assert info.length is not None, f"{where} is a variable-length string"

    with h5py.File(path, "r") as f:
        check("/", f)
        f.visititems(check)
    assert "/@format" in strings and "params/config_json" in strings and "params/config_json@sha256" in strings
    c = fmt.read_bundle(path)
    assert c.header["format_version"] == fmt.FORMAT_VERSION == 2 and c.training == {"device": "cpu", "note": "é"}


def test_a_format_1_bundle_still_reads():
    """The shipped model was written as format 1 (variable-length strings, HDF5 1.8 metadata)."""
    shipped = Path(__file__).resolve().parents[2] / "models" / "realistic-zoneplate-n64-g2.h5"
    if not shipped.is_file():
        pytest.skip("the shipped model is not next to the runtime")
    assert shipped.read_bytes()[8] == 0
    c = fmt.read_bundle(shipped)
    assert c.header["format_version"] == 1 and (c.params["N"], c.params["gridsize"]) == (64, 2)
    assert ("onnx", "diffraction_to_obj") in c.graphs and c.params["probe"].dtype == np.complex64
