"""The eager training loop on tiny simulated scans: it learns, it is reproducible, it stops, it refuses NaN."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402

from ptycho_export import params  # noqa: E402
from ptycho_export.config import ModelConfig, TrainingConfig  # noqa: E402
from ptycho_export.data import GroupedData, PtychoData, make_groups, simulate_scan  # noqa: E402
from ptycho_export.model import create_torch_model_with_gridsize, default_intensity_scale  # noqa: E402
from ptycho_export.training import (  # noqa: E402
    _evaluate,
    _tensors,
    loss_terms,
    predict_patches,
    resolve_device,
    seed_everything,
    train_autoencoder,
)
from ptycho_export.workflows.components import train_cdi_model_torch  # noqa: E402

N = 64


@pytest.fixture(scope="module")
def scan() -> PtychoData:
    return simulate_scan(N=N, object_size=160, scan="random", n_positions=24, seed=0)


@pytest.fixture(scope="module")
def test_scan() -> PtychoData:
    return simulate_scan(N=N, object_size=160, scan="random", n_positions=8, seed=1)


def _config(gridsize=1, **kw) -> TrainingConfig:
    defaults = dict(nepochs=3, batch_size=8, progress=False, device="cpu")
    defaults.update(kw)
    return TrainingConfig(model=ModelConfig(N=N, gridsize=gridsize, n_filters_scale=1), **defaults)


def _prepare(config: TrainingConfig, scan: PtychoData) -> None:
    """What run_cdi_example_torch does before training: params.cfg follows the config."""
    params.update_legacy_dict(params.cfg, config)
    params.cfg["probe"] = scan.probe


@pytest.mark.parametrize("gridsize", [1, 2])
def test_training_lowers_the_loss(scan, gridsize):
    config = _config(gridsize, nepochs=4, batch_size=4)
    _prepare(config, scan)
    scale = default_intensity_scale(config.nphotons, N)
    data = make_groups(scan, gridsize, seed=0, n_groups=12)
    seed_everything(0)
    ae = create_torch_model_with_gridsize(gridsize, N, params.cfg)["autoencoder"]
    x, off = _tensors(data, scale, torch.device("cpu"))
    before = _evaluate(ae, x, off, config)
    run = train_autoencoder(ae, data, scale, config, torch.device("cpu"))
    after = _evaluate(ae, x, off, config)
    hist = run["history"]
    assert run["epochs_run"] == 4
    assert len(hist["loss"]) == len(hist["val_loss"]) == len(hist["lr"]) == 4
    assert all(math.isfinite(v) for v in hist["loss"] + hist["val_loss"])
    assert hist["loss"][-1] < hist["loss"][0]
    assert after < 0.8 * before, (before, after)
    # loss parts are recorded and the total is their weighted sum (nll only by default)
    assert hist["nll"] == pytest.approx(hist["loss"])
    assert not ae.training  # left in eval mode
    assert run["n_train"] + run["n_val"] == data.B == 12 and run["n_val"] == round(0.1 * data.B)


def test_seeded_runs_are_identical_and_seed_matters(scan):
    def run(seed):
        params.reset_cfg()
        config = _config(nepochs=2, batch_size=4, n_groups=8, seed=seed)
        _prepare(config, scan)
        out = train_cdi_model_torch(scan, None, config)
        weights = out["models"]["diffraction_to_obj"].state_dict()
        return out["history"], weights

    h1, w1 = run(0)
    h2, w2 = run(0)
    h3, _ = run(5)
    assert h1 == h2  # bit-identical floats
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert h3["loss"] != h1["loss"]


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping(scan, patience):
    """lr so small that nothing changes: the val loss never improves after epoch 1."""
    config = _config(nepochs=6, batch_size=4, n_groups=6, learning_rate=1e-30,
                     early_stopping_patience=patience, val_fraction=0.34)
    _prepare(config, scan)
    out = train_cdi_model_torch(scan, None, config)
    hist = out["history"]
    assert out["training_summary"]["epochs_run"] == patience + 1 < config.nepochs
    assert len(hist["loss"]) == patience + 1
    assert len(set(hist["val_loss"])) == 1  # flat: no improvement, so it stopped


def test_no_early_stopping_runs_all_epochs(scan):
    config = _config(nepochs=3, batch_size=4, n_groups=4, learning_rate=1e-30)
    _prepare(config, scan)
    out = train_cdi_model_torch(scan, None, config)
    assert out["training_summary"]["epochs_run"] == 3


def test_nan_input_raises_clear_error(scan):
    bad_diffraction = scan.diffraction.copy()
    bad_diffraction[:, 0, 0] = np.nan
    bad = PtychoData(diffraction=bad_diffraction, xcoords=scan.xcoords, ycoords=scan.ycoords, probe=scan.probe)
    config = _config(nepochs=1, batch_size=4, n_groups=4)
    _prepare(config, bad)
    with pytest.raises((FloatingPointError, ValueError), match=r"(?i)nan"):
        train_cdi_model_torch(bad, None, config)


def test_train_cdi_model_returns_everything(scan, test_scan):
    config = _config(gridsize=2, nepochs=1, batch_size=4, n_groups=8)
    _prepare(config, scan)
    out = train_cdi_model_torch(scan, test_scan, config)
    assert {"history", "models", "intensity_scale", "train_container", "test_container"} <= set(out)
    assert set(out["history"]) >= {"loss", "val_loss", "lr"} and len(out["history"]["loss"]) == 1
    models = out["models"]
    assert set(models) == {"autoencoder", "diffraction_to_obj"}
    assert models["autoencoder"].diffraction_to_obj is models["diffraction_to_obj"]
    assert all(isinstance(m, torch.nn.Module) and not m.training for m in models.values())
    assert all(p.device.type == "cpu" for p in models["autoencoder"].parameters())
    scale = math.sqrt(1e9) / (N / 2)
    assert out["intensity_scale"] == pytest.approx(scale)
    assert params.cfg["intensity_scale"] == pytest.approx(scale)
    np.testing.assert_array_equal(params.cfg["probe"], scan.probe)
    tr, te = out["train_container"], out["test_container"]
    assert isinstance(tr, GroupedData) and isinstance(te, GroupedData)
    assert tr.diffraction.shape == (8, 4, N, N)  # n_groups groups of gridsize**2
    assert te.diffraction.shape == (test_scan.n, 4, N, N)  # every test position anchors a group
    np.testing.assert_allclose(tr.offsets.sum(axis=1), 0, atol=1e-3)
    np.testing.assert_array_equal(out["probe"], scan.probe)
    summary = out["training_summary"]
    assert summary["epochs_run"] == 1 and summary["n_train"] + summary["n_val"] == 8
    assert summary["device"] == "cpu"


def test_train_cdi_model_without_test_data(scan):
    config = _config(nepochs=1, batch_size=4, n_groups=4)
    _prepare(config, scan)
    out = train_cdi_model_torch(scan, None, config)
    assert out["test_container"] is None
    assert out["train_container"].diffraction.shape == (4, 1, N, N)


def test_train_cdi_model_rejects_bad_inputs(scan):
    with pytest.raises(ValueError, match="train_data is required"):
        train_cdi_model_torch(None, None, _config())
    config = TrainingConfig(model=ModelConfig(N=128, n_filters_scale=1), nepochs=1, progress=False)
    with pytest.raises(ValueError, match=r"N=64 but config.model.N=128"):
        train_cdi_model_torch(scan, None, config)


def test_explicit_intensity_scale_is_used(scan):
    model = ModelConfig(N=N, n_filters_scale=1, intensity_scale=5.0)
    config = TrainingConfig(model=model, nepochs=1, batch_size=4, n_groups=4, progress=False, device="cpu")
    _prepare(config, scan)
    out = train_cdi_model_torch(scan, None, config)
    assert out["intensity_scale"] == 5.0 and params.cfg["intensity_scale"] == 5.0


def test_mae_only_loss(scan):
    config = _config(nepochs=1, batch_size=4, n_groups=4, nll_weight=0.0, mae_weight=1.0)
    _prepare(config, scan)
    hist = train_cdi_model_torch(scan, None, config)["history"]
    assert "mae" in hist and "nll" not in hist
    assert hist["mae"] == pytest.approx(hist["loss"])


def test_loss_terms_weighting():
    torch.manual_seed(0)
    ae = create_torch_model_with_gridsize(1, N, dict(params.cfg, n_filters_scale=1))["autoencoder"].eval()
    x = torch.rand(2, 1, N, N) * 100
    off = torch.zeros(2, 1, 1, 2)
    with torch.no_grad():
        both, parts = loss_terms(ae, x, off, _config(nll_weight=2.0, mae_weight=3.0))
    assert set(parts) == {"nll", "mae"}
    assert float(both) == pytest.approx(2.0 * parts["nll"] + 3.0 * parts["mae"], rel=1e-5)
    assert parts["nll"] > 0 and parts["mae"] > 0


def test_predict_patches_applies_the_input_scale(scan):
    torch.manual_seed(0)
    d2o = create_torch_model_with_gridsize(1, N, dict(params.cfg, n_filters_scale=1))["diffraction_to_obj"]
    diff = scan.diffraction[:5, None]
    out = predict_patches(d2o, diff, 12.0, batch_size=2)
    assert out.shape == (5, 1, N, N) and out.dtype == np.complex64
    with torch.no_grad():
        ref = d2o(torch.from_numpy(diff * np.float32(12.0))).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cuda' was requested"):
            resolve_device("cuda")
