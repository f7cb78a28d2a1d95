"""save_torch_bundle / load_torch_bundle: round trip, CONFIG-001, and every way a bundle can be wrong."""

from __future__ import annotations

import json
import math
import os
import shutil
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from ptycho_export import params  # noqa: E402
from ptycho_export.config import ModelConfig, TrainingConfig  # noqa: E402
from ptycho_export.data import default_probe  # noqa: E402
from ptycho_export.model import create_torch_model_with_gridsize  # noqa: E402
from ptycho_export.model_manager import load_torch_bundle, save_torch_bundle  # noqa: E402
from ptycho_runtime import format as fmt  # noqa: E402
from ptycho_runtime.format import BundleChecksumError, BundleFormatError  # noqa: E402
from ptycho_runtime.format import writer as fmt_writer  # noqa: E402

N, GRIDSIZE, NPHOTONS = 64, 2, 1e6
SAVED_SCALE = 7.25  # the input scale of the normalisation contract, written to params
TRAINED_SCALE = 9.0  # what the model's (trainable) scaler holds
WEIGHT = "generator.encoder.stages.0.conv1.weight"


def _build_models(seed: int):
    config = TrainingConfig(model=ModelConfig(N=N, gridsize=GRIDSIZE, n_filters_scale=1), nphotons=NPHOTONS,
                            nepochs=3, batch_size=4, progress=False)
    params.reset_cfg()
    params.update_legacy_dict(params.cfg, config)
    params.cfg["intensity_scale"] = SAVED_SCALE
    params.cfg["probe"] = default_probe(N, defocus=3.0)
    torch.manual_seed(seed)
    models = create_torch_model_with_gridsize(GRIDSIZE, N, params.cfg)
    with torch.no_grad():  # not an initialisation any fresh model could reproduce
        for p in models["autoencoder"].parameters():
            p.add_(0.01 * torch.randn_like(p))
        models["diffraction_to_obj"].scaler.log_scale.fill_(math.log(TRAINED_SCALE))
    for m in models.values():
        m.eval()
    return models, config


def _fixed_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.rand(2, GRIDSIZE**2, N, N, generator=g) * 40.0


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One real bundle, saved once; tests copy it before changing anything."""
    models, config = _build_models(seed=0)
    path = tmp_path_factory.mktemp("saved") / "wts.h5"
    history = {"loss": [3.0, 2.0, 1.5], "val_loss": [3.1, 2.2, 1.6]}
    out = save_torch_bundle(models, path, config, intensity_scale=SAVED_SCALE, history=history,
                            training_summary={"epochs_run": 3})
    assert out == path
    x = _fixed_input()
    with torch.no_grad():
        expected = models["diffraction_to_obj"](x)
    state = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    params.reset_cfg()
    return {"path": path, "models": models, "config": config, "x": x, "expected": expected, "state": state}


@pytest.fixture
def bundle(saved, tmp_path) -> Path:
    dst = tmp_path / "wts.h5"
    shutil.copyfile(saved["path"], dst)
    return dst


def _clobber_params():
    params.cfg.update({"N": 128, "gridsize": 1, "nphotons": 1e3, "intensity_scale": 1.0, "n_filters_scale": 2,
                       "probe": None})


def _replace_json(path: Path, dataset: str, edit) -> None:
    """Rewrite a JSON dataset and give it a correct sha256 (a well-formed but different bundle)."""
    with h5py.File(path, "r+") as f:
        value = json.loads(f[dataset][()].decode())
        edit(value)
        text = json.dumps(value)
        parent, name = dataset.rsplit("/", 1)
        del f[dataset]
        ds = f[parent].create_dataset(name, data=text, dtype=h5py.string_dtype("utf-8"))
        ds.attrs[fmt.CHECKSUM_ATTR] = fmt.sha256_hex(text)


def _put_array(path: Path, dataset: str, value: np.ndarray) -> None:
    with h5py.File(path, "r+") as f:
        if dataset in f:
            del f[dataset]
        parent, name = dataset.rsplit("/", 1)
        ds = f[parent].create_dataset(name, data=value)
        ds.attrs[fmt.CHECKSUM_ATTR] = fmt.sha256_hex(value)


# --------------------------------------------------------------------------- round trip


class TestLoadTorchBundle:
    def test_load_round_trip_returns_model_stub(self, saved, bundle):
        _clobber_params()
        model, bundle_params = load_torch_bundle(bundle, model_name="diffraction_to_obj")
        # CONFIG-001: params.cfg holds the saved values again
        assert params.cfg["N"] == N
        assert params.cfg["gridsize"] == GRIDSIZE
        assert params.cfg["nphotons"] == NPHOTONS
        assert params.cfg["intensity_scale"] == SAVED_SCALE
        assert params.cfg["n_filters_scale"] == 1
        np.testing.assert_array_equal(params.cfg["probe"], default_probe(N, defocus=3.0))
        assert bundle_params["N"] == N and bundle_params["intensity_scale"] == SAVED_SCALE
        assert bundle_params is not params.cfg
        # the model
        assert isinstance(model, torch.nn.Module)
        assert type(model).__name__ == "DiffractionToObject"
        assert not model.training and all(not m.training for m in model.modules())
        assert float(model.scaler.scale().detach()) == pytest.approx(TRAINED_SCALE, rel=1e-6)
        with torch.no_grad():
            out = model(saved["x"])
        assert out.dtype == torch.complex64 and out.shape == (2, GRIDSIZE**2, N, N)
        assert float((out - saved["expected"]).abs().max()) <= 1e-6

    def test_model_name_none_returns_both_models(self, saved, bundle):
        models, bundle_params = load_torch_bundle(bundle)
        assert set(models) == {"autoencoder", "diffraction_to_obj"}
        assert models["autoencoder"].diffraction_to_obj is models["diffraction_to_obj"]
        assert all(not m.training for m in models.values())
        for name, model in models.items():
            for key, ref in saved["state"][name].items():
                assert torch.equal(model.state_dict()[key], ref), (name, key)
        with torch.no_grad():
            obj, amp, inten = models["autoencoder"](saved["x"], torch.zeros(2, GRIDSIZE**2, 1, 2))
        assert float((obj - saved["expected"]).abs().max()) <= 1e-6
        assert torch.all(torch.isfinite(inten))

    def test_autoencoder_only(self, saved, bundle):
        model, _ = load_torch_bundle(bundle, model_name="autoencoder")
        assert type(model).__name__ == "Autoencoder"

    def test_bad_model_name(self, bundle):
        with pytest.raises(ValueError, match=r"model_name must be one of autoencoder, diffraction_to_obj"):
            load_torch_bundle(bundle, model_name="encoder")

    def test_directory_holding_wts_h5_is_accepted(self, saved, bundle):
        model, _ = load_torch_bundle(bundle.parent, model_name="diffraction_to_obj")
        with torch.no_grad():
            assert float((model(saved["x"]) - saved["expected"]).abs().max()) <= 1e-6

    def test_str_path_accepted(self, bundle):
        model, _ = load_torch_bundle(str(bundle), model_name="diffraction_to_obj")
        assert isinstance(model, torch.nn.Module)

    def test_real_trained_bundle(self, make_bundle):
        path = make_bundle(graphs=False)
        models, bundle_params = load_torch_bundle(path)
        assert bundle_params["intensity_scale"] == pytest.approx(math.sqrt(1e9) / 32)
        assert bundle_params["nepochs"] == 1 and params.cfg["nepochs"] == 1
        from ptycho_export.data import load_npz

        scan = load_npz(path.parent / "scan.npz")
        x = torch.from_numpy(scan.diffraction[:3, None] * np.float32(bundle_params["intensity_scale"]))
        with torch.no_grad():
            obj = models["diffraction_to_obj"](x)
        assert torch.all(torch.isfinite(torch.view_as_real(obj)))


# --------------------------------------------------------------------------- contents


def test_dtype_and_shape_preserved_for_every_tensor(saved, bundle):
    with h5py.File(bundle, "r") as f:
        for name, state in saved["state"].items():
            group = f[f"models/{name}/state_dict"]
            assert set(group) == set(state)
            for key, tensor in state.items():
                ds = group[key]
                ref = tensor.numpy()
                assert ds.shape == ref.shape, key
                assert ds.dtype == ref.dtype, key
                np.testing.assert_array_equal(ds[()], ref)
        n_params = f["models/diffraction_to_obj"].attrs["n_parameters"]
        assert n_params == sum(t.numel() for t in saved["models"]["diffraction_to_obj"].parameters())


def test_no_pickle_only_numbers_and_text(bundle):
    assert h5py.is_hdf5(bundle)
    with open(bundle, "rb") as fh:
        assert fh.read(8) == b"\x89HDF\r\n\x1a\n"
    seen = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            seen.append(name)
            if h5py.check_string_dtype(obj.dtype) is not None:
                text = obj[()].decode()
                if name.endswith("_json"):
                    json.loads(text)
            else:
                assert obj.dtype.kind in "biufc", (name, obj.dtype)  # no object/opaque/vlen payloads
            assert fmt.CHECKSUM_ATTR in obj.attrs, name

    with h5py.File(bundle, "r") as f:
        f.visititems(visit)
        assert f.attrs["format"].decode() == fmt.FORMAT_NAME  # format 2: fixed-length strings read as bytes
        assert int(f.attrs["format_version"]) == fmt.FORMAT_VERSION
        probe = f["params/arrays/probe"]
        assert probe.dtype == np.complex64 and probe.shape == (N, N)
        config = json.loads(f["params/config_json"][()].decode())
        assert config["N"] == N and config["gridsize"] == GRIDSIZE and config["nepochs"] == 3
        assert "probe" not in config
        np.testing.assert_allclose(f["training/history/loss"][()], [3.0, 2.0, 1.5])
        summary = json.loads(f["training/summary_json"][()].decode())
        assert summary["intensity_scale"] == SAVED_SCALE
        assert summary["trained_intensity_scale"] == pytest.approx(TRAINED_SCALE, rel=1e-6)
        assert summary["epochs_run"] == 3
    assert any(s.startswith("models/diffraction_to_obj/state_dict/") for s in seen)


def test_default_intensity_scale_comes_from_params(saved, tmp_path):
    params.update_legacy_dict(params.cfg, saved["config"])
    params.cfg["intensity_scale"] = 3.5
    save_torch_bundle(saved["models"], tmp_path / "a.h5", saved["config"])
    params.cfg["intensity_scale"] = None
    save_torch_bundle(saved["models"], tmp_path / "b.h5", saved["config"])
    assert load_torch_bundle(tmp_path / "a.h5")[1]["intensity_scale"] == 3.5
    # without one in params, the model's own (trained) scale is written
    assert load_torch_bundle(tmp_path / "b.h5")[1]["intensity_scale"] == pytest.approx(TRAINED_SCALE, rel=1e-6)


# --------------------------------------------------------------------------- errors


def test_save_requires_both_models(saved, tmp_path):
    models = {"diffraction_to_obj": saved["models"]["diffraction_to_obj"]}
    with pytest.raises(ValueError, match=r"'autoencoder' is missing from models_dict"):
        save_torch_bundle(models, tmp_path / "wts.h5", saved["config"])
    with pytest.raises(ValueError, match=r"'diffraction_to_obj' is missing"):
        save_torch_bundle({"autoencoder": saved["models"]["autoencoder"]}, tmp_path / "wts.h5", saved["config"])
    assert not (tmp_path / "wts.h5").exists()
    assert list(tmp_path.iterdir()) == []


def test_bundle_without_N(bundle):
    _replace_json(bundle, "params/config_json", lambda d: d.pop("N"))
    _clobber_params()
    before = dict(params.cfg)
    with pytest.raises(ValueError, match=r"Cannot reconstruct model architecture: .* no N in its params"):
        load_torch_bundle(bundle, model_name="diffraction_to_obj")
    assert params.cfg == before  # nothing restored from a bundle that cannot be used


def test_bundle_without_gridsize(bundle):
    _replace_json(bundle, "params/config_json", lambda d: d.update(gridsize=None))
    with pytest.raises(ValueError, match=r"Cannot reconstruct model architecture: .*gridsize"):
        load_torch_bundle(bundle)


def test_newer_format_version(bundle):
    with h5py.File(bundle, "r+") as f:
        f.attrs["format_version"] = fmt.FORMAT_VERSION + 1
    with pytest.raises(BundleFormatError, match=rf"version {fmt.FORMAT_VERSION + 1}; this package reads "
                                                rf"format version {fmt.FORMAT_VERSION} and older"):
        load_torch_bundle(bundle)


def test_missing_format_version(bundle):
    with h5py.File(bundle, "r+") as f:
        del f.attrs["format_version"]
    with pytest.raises(BundleFormatError, match="no valid 'format_version'"):
        load_torch_bundle(bundle)


def test_checksum_mismatch_on_weight(bundle):
    with h5py.File(bundle, "r+") as f:
        ds = f[f"models/diffraction_to_obj/state_dict/{WEIGHT}"]
        value = ds[()]
        value.flat[0] += 0.5
        ds[...] = value  # sha256 attribute left as it was
    with pytest.raises(BundleChecksumError, match=rf"Checksum mismatch in .*{WEIGHT}"):
        load_torch_bundle(bundle, model_name="diffraction_to_obj")
    assert issubclass(BundleChecksumError, BundleFormatError)


def test_checksum_mismatch_on_params(bundle):
    with h5py.File(bundle, "r+") as f:
        ds = f["params/arrays/probe"]
        value = ds[()]
        value[0, 0] += 1
        ds[...] = value
    _clobber_params()
    with pytest.raises(BundleChecksumError, match="params/arrays/probe"):
        load_torch_bundle(bundle)
    assert params.cfg["N"] == 128  # not restored from a damaged bundle


def test_missing_checksum_attribute(bundle):
    with h5py.File(bundle, "r+") as f:
        del f[f"models/diffraction_to_obj/state_dict/{WEIGHT}"].attrs[fmt.CHECKSUM_ATTR]
    with pytest.raises(BundleChecksumError, match="has no sha256 attribute"):
        load_torch_bundle(bundle)


def test_truncated_file(bundle):
    data = bundle.read_bytes()
    bundle.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleFormatError, match=r"truncated|damaged"):
        load_torch_bundle(bundle)


def test_random_hdf5_is_not_a_bundle(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(10)
        f.attrs["format"] = "something-else"
    with pytest.raises(BundleFormatError, match="not a ptycho-export bundle"):
        load_torch_bundle(path)


def test_zip_file_is_rejected(tmp_path):
    path = tmp_path / "wts.h5.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model.pkl", b"\x80\x04not really a pickle")
    with pytest.raises(BundleFormatError, match=r"zip archive.*not a ptycho-export bundle"):
        load_torch_bundle(path)


def test_text_file_is_rejected(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(BundleFormatError, match="not an HDF5 file"):
        load_torch_bundle(path)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="No bundle at"):
        load_torch_bundle(tmp_path / "nope.h5")
    with pytest.raises(FileNotFoundError, match="wts.h5"):
        load_torch_bundle(tmp_path)  # a folder without wts.h5


def test_missing_params_group(bundle):
    with h5py.File(bundle, "r+") as f:
        del f["params/config_json"]
    with pytest.raises(BundleFormatError, match="no /params/config_json"):
        load_torch_bundle(bundle)


def test_missing_model_weights(bundle):
    with h5py.File(bundle, "r+") as f:
        del f["models/diffraction_to_obj"]
    with pytest.raises(BundleFormatError, match="no eager weights for 'diffraction_to_obj'"):
        load_torch_bundle(bundle, model_name="diffraction_to_obj")


def test_extra_tensor_is_rejected(bundle):
    _put_array(bundle, "models/diffraction_to_obj/state_dict/extra.weight", np.ones(3, np.float32))
    with pytest.raises(BundleFormatError, match=r"unexpected \['extra.weight'\]"):
        load_torch_bundle(bundle, model_name="diffraction_to_obj")


def test_missing_tensor_is_rejected(bundle):
    with h5py.File(bundle, "r+") as f:
        del f[f"models/diffraction_to_obj/state_dict/{WEIGHT}"]
    with pytest.raises(BundleFormatError, match=rf"missing \['{WEIGHT}'\]"):
        load_torch_bundle(bundle, model_name="diffraction_to_obj")


def test_wrong_shape_tensor_is_rejected(bundle):
    _put_array(bundle, f"models/diffraction_to_obj/state_dict/{WEIGHT}", np.zeros((16, 4, 3, 3), np.float32))
    with pytest.raises(BundleFormatError, match=r"has shape \(16, 4, 3, 3\).*expects \(32, 4, 3, 3\)"):
        load_torch_bundle(bundle, model_name="diffraction_to_obj")


def test_wrong_dtype_tensor_is_rejected(bundle):
    _put_array(bundle, f"models/diffraction_to_obj/state_dict/{WEIGHT}", np.zeros((32, 4, 3, 3), np.float64))
    with pytest.raises(BundleFormatError, match=r"torch.float64.*expects .*torch.float32"):
        load_torch_bundle(bundle, model_name="diffraction_to_obj")


def test_params_disagreeing_with_weights_is_rejected(bundle):
    """A bundle whose params say another architecture (with valid checksums) must not load silently."""
    _replace_json(bundle, "params/config_json", lambda d: d.update(n_filters_scale=2))
    # refused by the reader policy already (architecture_json vs params), before any model is built
    with pytest.raises(BundleFormatError, match="n_filters_scale=1 but the params say 2"):
        load_torch_bundle(bundle, model_name="diffraction_to_obj")


# --------------------------------------------------------------------------- atomic save


@pytest.mark.parametrize("target", ["write_payload", "_write_model"])
def test_crash_during_save_keeps_previous_bundle(saved, bundle, monkeypatch, target):
    before = bundle.read_bytes()
    other, config = _build_models(seed=1)  # different weights: a completed save would change the file
    calls = {"n": 0}
    if target == "write_payload":
        real = fmt_writer.write_payload

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 25:
                raise RuntimeError("disk full (simulated)")
            return real(*args, **kwargs)

        monkeypatch.setattr(fmt_writer, "write_payload", flaky)
    else:
        real = fmt_writer._write_model

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # the first model was written, the second fails
                raise RuntimeError("disk full (simulated)")
            return real(*args, **kwargs)

        monkeypatch.setattr(fmt_writer, "_write_model", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        save_torch_bundle(other, bundle, config, intensity_scale=SAVED_SCALE)
    assert calls["n"] >= 2  # it really failed midway
    assert bundle.read_bytes() == before
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["wts.h5"]  # no temp files left
    monkeypatch.undo()
    model, _ = load_torch_bundle(bundle, model_name="diffraction_to_obj")
    with torch.no_grad():
        assert float((model(saved["x"]) - saved["expected"]).abs().max()) <= 1e-6
    # and a save that completes does replace it
    save_torch_bundle(other, bundle, config, intensity_scale=SAVED_SCALE)
    assert bundle.read_bytes() != before
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["wts.h5"]


def test_crash_during_first_save_leaves_nothing(saved, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("simulated failure")

    monkeypatch.setattr(fmt_writer, "_write_model", boom)
    target = tmp_path / "out" / "wts.h5"
    with pytest.raises(OSError, match="simulated failure"):
        save_torch_bundle(saved["models"], target, saved["config"])
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_save_overwrites_and_creates_parent(saved, tmp_path):
    target = tmp_path / "a" / "b" / "wts.h5"
    params.update_legacy_dict(params.cfg, saved["config"])
    save_torch_bundle(saved["models"], target, saved["config"], intensity_scale=1.5)
    save_torch_bundle(saved["models"], os.fspath(target), saved["config"], intensity_scale=2.5)
    assert load_torch_bundle(target)[1]["intensity_scale"] == 2.5
    assert sorted(p.name for p in target.parent.iterdir()) == ["wts.h5"]
