"""Workflow entry points: run_cdi_example_torch persists and stitches; load_inference_bundle_torch restores."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from ptycho_export import params  # noqa: E402
from ptycho_export.config import ModelConfig, TrainingConfig  # noqa: E402
from ptycho_export.data import PtychoData, save_npz, simulate_scan  # noqa: E402
from ptycho_export.model import count_parameters  # noqa: E402
from ptycho_export.model_manager import load_torch_bundle, save_torch_bundle  # noqa: E402
from ptycho_export.workflows import components  # noqa: E402

N = 64
# Graph export (ONNX/TorchScript) belongs to the export tests; keep these runs to training and saving.
NO_GRAPHS = {"export_graphs": False} if "export_graphs" in {f.name for f in fields(TrainingConfig)} else {}


@pytest.fixture(scope="module")
def train_scan() -> PtychoData:
    return simulate_scan(N=N, object_size=160, scan="random", n_positions=24, seed=0)


@pytest.fixture(scope="module")
def test_scan() -> PtychoData:
    return simulate_scan(N=N, object_size=160, scan="random", n_positions=12, seed=2)


def _config(output_dir=None, **kw) -> TrainingConfig:
    model_kw = {k: kw.pop(k) for k in list(kw) if k in ("gridsize", "amp_activation")}
    defaults = dict(nepochs=1, batch_size=8, progress=False, device="cpu", n_groups=16, **NO_GRAPHS)
    defaults.update(kw)
    return TrainingConfig(model=ModelConfig(N=N, n_filters_scale=1, **model_kw), output_dir=output_dir, **defaults)


class _Spy:
    """Records every call, then calls the real function."""

    def __init__(self, real):
        self.real = real
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.real(*args, **kwargs)


class TestWorkflowsComponentsRun:
    def test_run_cdi_example_persists_models(self, monkeypatch, tmp_path, train_scan):
        spy = _Spy(save_torch_bundle)
        monkeypatch.setattr(components, "save_torch_bundle", spy)
        amp, phase, results = components.run_cdi_example_torch(train_scan, None, _config(output_dir=tmp_path))
        assert len(spy.calls) == 1
        args, kwargs = spy.calls[0]
        models, path = args[0], args[1]
        assert isinstance(models, dict) and {"autoencoder", "diffraction_to_obj"} <= set(models)
        assert all(isinstance(models[k], torch.nn.Module) for k in ("autoencoder", "diffraction_to_obj"))
        assert models is results["models"]
        assert Path(path) == tmp_path / "wts.h5"
        assert (tmp_path / "wts.h5").is_file()
        assert results["bundle_path"] == tmp_path / "wts.h5"
        assert kwargs["intensity_scale"] == pytest.approx(math.sqrt(1e9) / 32)
        assert list(kwargs["history"]["loss"]) == results["history"]["loss"]
        assert amp is None and phase is None  # no stitching requested
        # the file holds what was trained
        loaded, bundle_params = load_torch_bundle(tmp_path / "wts.h5")
        for key, value in models["diffraction_to_obj"].state_dict().items():
            assert torch.equal(loaded["diffraction_to_obj"].state_dict()[key], value), key
        assert bundle_params["output_prefix"] == str(tmp_path)
        if NO_GRAPHS:
            with h5py.File(tmp_path / "wts.h5", "r") as f:
                assert "graphs" not in f  # export_graphs=False

        # without output_dir: nothing is saved anywhere
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        _, _, results2 = components.run_cdi_example_torch(train_scan, None, _config(output_dir=None))
        assert len(spy.calls) == 1
        assert "bundle_path" not in results2
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before
        assert list(cwd.iterdir()) == []

    def test_load_inference_bundle_handles_bundle(self, monkeypatch, tmp_path, train_scan):
        # a real bundle from a real save
        config = _config(gridsize=2, nphotons=1e7)
        params.update_legacy_dict(params.cfg, config)
        results = components.train_cdi_model_torch(train_scan, None, config)
        bundle_dir = tmp_path / "bundle"
        save_torch_bundle(results["models"], bundle_dir / "wts.h5", config,
                          intensity_scale=results["intensity_scale"], probe=results["probe"])
        x = torch.from_numpy(results["train_container"].diffraction[:2] * np.float32(results["intensity_scale"]))
        with torch.no_grad():
            expected = results["models"]["diffraction_to_obj"](x)

        spy = _Spy(load_torch_bundle)
        monkeypatch.setattr(components, "load_torch_bundle", spy)
        params.reset_cfg()
        params.cfg.update({"N": 128, "gridsize": 1, "nphotons": 1.0, "intensity_scale": 99.0, "probe": None})
        out = components.load_inference_bundle_torch(bundle_dir)

        assert len(spy.calls) == 1
        args, kwargs = spy.calls[0]
        assert args == (bundle_dir / "wts.h5",)
        assert kwargs == {"model_name": "diffraction_to_obj"}
        assert isinstance(out, tuple) and len(out) == 2
        models, bundle_params = out
        assert isinstance(models, dict) and list(models) == ["diffraction_to_obj"]
        model = models["diffraction_to_obj"]
        assert isinstance(model, torch.nn.Module) and not model.training
        assert isinstance(bundle_params, dict)
        assert bundle_params["gridsize"] == 2 and bundle_params["N"] == N
        # CONFIG-001: params.cfg was restored from the bundle
        assert params.cfg["N"] == N and params.cfg["gridsize"] == 2
        assert params.cfg["nphotons"] == 1e7
        assert params.cfg["intensity_scale"] == pytest.approx(results["intensity_scale"])
        np.testing.assert_array_equal(params.cfg["probe"], train_scan.probe)
        with torch.no_grad():
            assert float((model(x) - expected).abs().max()) <= 1e-6

    def test_load_inference_bundle_accepts_str_and_reports_missing(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="wts.h5"):
            components.load_inference_bundle_torch(str(tmp_path))

    def test_do_stitching_returns_amplitude_and_phase(self, tmp_path, train_scan, test_scan):
        amp, phase, results = components.run_cdi_example_torch(train_scan, test_scan, _config(),
                                                               do_stitching=True)
        assert isinstance(amp, np.ndarray) and isinstance(phase, np.ndarray)
        assert amp.ndim == 2 and amp.shape == phase.shape
        assert np.all(np.isfinite(amp)) and np.all(np.isfinite(phase))
        assert np.all(amp >= 0) and np.all(np.abs(phase) <= np.pi + 1e-6)
        # the canvas spans every test patch
        span_x = np.ptp(test_scan.xcoords) + N
        span_y = np.ptp(test_scan.ycoords) + N
        assert span_y <= amp.shape[0] <= span_y + 6 and span_x <= amp.shape[1] <= span_x + 6
        recon = results["reconstruction"]
        np.testing.assert_array_equal(recon.amplitude, amp)
        assert recon.covered.any() and amp[recon.covered].max() > 0
        assert results["reconstruction_time_s"] >= 0

    def test_do_stitching_false_returns_none(self, train_scan, test_scan):
        amp, phase, results = components.run_cdi_example_torch(train_scan, test_scan, _config(),
                                                               do_stitching=False)
        assert amp is None and phase is None
        assert isinstance(results, dict) and "reconstruction" not in results
        assert results["test_container"] is not None

    def test_do_stitching_without_test_data_returns_none(self, train_scan):
        amp, phase, _ = components.run_cdi_example_torch(train_scan, None, _config(), do_stitching=True)
        assert amp is None and phase is None

    def test_updates_params_cfg_first(self, monkeypatch, tmp_path, train_scan):
        seen = {}
        real = components.train_cdi_model_torch

        def spy(train, test, config):
            seen.update(params.cfg)  # what training sees when it starts
            return real(train, test, config)

        monkeypatch.setattr(components, "train_cdi_model_torch", spy)
        config = _config(output_dir=tmp_path / "out", nepochs=2, batch_size=8, amp_activation="softplus",
                         learning_rate=2e-3)
        _, _, results = components.run_cdi_example_torch(train_scan, None, config)
        for cfg in (seen, params.cfg):
            assert cfg["nepochs"] == 2
            assert cfg["batch_size"] == 8
            assert cfg["output_prefix"] == str(tmp_path / "out")
            assert cfg["n_filters_scale"] == 1
            assert cfg["amp_activation"] == "softplus"
            assert cfg["learning_rate"] == 2e-3
        # the model was built from the synced params: the config's architecture, not the defaults
        d2o = results["models"]["diffraction_to_obj"]
        assert d2o.generator.decoder_a.activation.name == "softplus"
        assert d2o.generator.encoder.stages[0].conv2.out_channels == 32
        assert count_parameters(d2o) < 1e6
        assert len(results["history"]["loss"]) == 2

    def test_accepts_npz_paths(self, tmp_path, train_scan):
        path = tmp_path / "train.npz"
        save_npz(path, train_scan)
        _, _, results = components.run_cdi_example_torch(path, None, _config(n_groups=4))
        assert results["train_container"].diffraction.shape == (4, 1, N, N)
