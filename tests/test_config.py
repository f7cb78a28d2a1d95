"""Tests for the typed configs, the legacy ``params.cfg`` dict and the mapping between them.

No torch here: configs and params must be usable (and importable) without the model stack.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ptycho_export import params
from ptycho_export.config import (
    AMP_ACTIVATIONS,
    ModelConfig,
    TrainingConfig,
    config_to_flat_dict,
)
from ptycho_export.params import (
    DEFAULTS,
    KEY_MAPPINGS,
    legacy_key,
    model_config_from_params,
    restore_params,
    update_legacy_dict,
)

# --------------------------------------------------------------------------- torch-free import


def test_config_and_params_import_without_torch():
    """Importing config/params must not need (or pull in) torch."""
    code = textwrap.dedent(
        """
        import sys

        class _BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, _BlockTorch())
        import ptycho_export.config as c
        import ptycho_export.params as p
        assert "torch" not in sys.modules, "torch was imported"
        p.update_legacy_dict(p.cfg, c.TrainingConfig(model=c.ModelConfig(N=128)))
        assert p.cfg["N"] == 128
        print("OK")
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"


# --------------------------------------------------------------------------- ModelConfig validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(N=100), r"N must be one of 64, 128, 256 \(got 100\)"),
        (dict(N=32), r"N must be one of 64, 128, 256 \(got 32\)"),
        (dict(N="64"), r"N must be one of 64, 128, 256 \(got '64'\)"),
        (dict(gridsize=4), r"gridsize must be one of 1, 2, 3 \(got 4\)"),
        (dict(gridsize=0), r"gridsize must be one of 1, 2, 3 \(got 0\)"),
        (dict(n_filters_scale=0), r"n_filters_scale must be > 0 \(got 0\)"),
        (dict(n_filters_scale=-1), r"n_filters_scale must be > 0 \(got -1\)"),
        (dict(n_filters_scale=1.5), r"n_filters_scale must be an integer \(got 1.5\)"),
        (dict(n_filters_scale=True), r"n_filters_scale must be an integer \(got True\)"),
        (dict(amp_activation="tanh"),
         r"amp_activation must be one of 'sigmoid', 'swish', 'silu', 'softplus', 'relu' \(got 'tanh'\)"),
        (dict(output_mode="complex"), r"output_mode must be one of 'amp_phase', 'real_imag' \(got 'complex'\)"),
        (dict(intensity_scale=-1.0), r"intensity_scale must be >= 0 \(got -1.0\)"),
    ],
)
def test_model_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("N", [64, 128, 256])
@pytest.mark.parametrize("gridsize", [1, 2, 3])
def test_model_config_accepts_allowed_sizes(N, gridsize):
    cfg = ModelConfig(N=N, gridsize=gridsize)
    assert (cfg.N, cfg.gridsize, cfg.channels) == (N, gridsize, gridsize**2)


@pytest.mark.parametrize("activation", AMP_ACTIVATIONS)
def test_model_config_accepts_every_activation(activation):
    assert ModelConfig(amp_activation=activation).amp_activation == activation


def test_model_config_intensity_scale_zero_is_allowed_and_default():
    assert ModelConfig().intensity_scale == 0.0
    assert ModelConfig(intensity_scale=3.5).intensity_scale == 3.5


# --------------------------------------------------------------------------- TrainingConfig validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), r"batch_size must be > 0 \(got 0\)"),
        (dict(batch_size=2.0), r"batch_size must be an integer \(got 2.0\)"),
        (dict(nepochs=0), r"nepochs must be > 0 \(got 0\)"),
        (dict(nepochs=-3), r"nepochs must be > 0 \(got -3\)"),
        (dict(learning_rate=0.0), r"learning_rate must be > 0 \(got 0.0\)"),
        (dict(learning_rate=-1e-3), r"learning_rate must be > 0 \(got -0.001\)"),
        (dict(learning_rate="1e-3"), r"learning_rate must be a number \(got '1e-3'\)"),
        (dict(nll_weight=-1.0), r"nll_weight must be >= 0 \(got -1.0\)"),
        (dict(mae_weight=-0.5), r"mae_weight must be >= 0 \(got -0.5\)"),
        (dict(nll_weight=0.0, mae_weight=0.0), r"nll_weight and mae_weight are both 0"),
        (dict(nphotons=0), r"nphotons must be > 0 \(got 0\)"),
        (dict(val_fraction=1.0), r"val_fraction must be in \[0, 1\) \(got 1.0\)"),
        (dict(val_fraction=-0.1), r"val_fraction must be in \[0, 1\) \(got -0.1\)"),
        (dict(early_stopping_patience=0), r"early_stopping_patience must be > 0 \(got 0\)"),
        (dict(lr_plateau_patience=0), r"lr_plateau_patience must be > 0 \(got 0\)"),
        (dict(lr_plateau_factor=1.0), r"lr_plateau_factor must be in \(0, 1\) \(got 1.0\)"),
        (dict(lr_plateau_factor=0.0), r"lr_plateau_factor must be in \(0, 1\) \(got 0.0\)"),
        (dict(n_groups=0), r"n_groups must be > 0 \(got 0\)"),
        (dict(device="gpu"), r"device must be one of 'auto', 'cpu', 'cuda' \(got 'gpu'\)"),
        (dict(model={"N": 64}), r"model must be a ModelConfig \(got dict\)"),
    ],
)
def test_training_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**kwargs)


def test_training_config_one_zero_weight_is_fine():
    assert TrainingConfig(nll_weight=0.0, mae_weight=1.0).nll_weight == 0.0
    assert TrainingConfig(nll_weight=1.0, mae_weight=0.0).mae_weight == 0.0
    assert TrainingConfig(val_fraction=0.0).val_fraction == 0.0


def test_training_config_paths_become_paths(tmp_path):
    cfg = TrainingConfig(output_dir=str(tmp_path), train_data_file="a.npz", test_data_file=Path("b.npz"))
    assert cfg.output_dir == tmp_path and isinstance(cfg.output_dir, Path)
    assert cfg.train_data_file == Path("a.npz") and isinstance(cfg.train_data_file, Path)
    assert cfg.test_data_file == Path("b.npz")


# --------------------------------------------------------------------------- inert options are gone


@pytest.mark.parametrize("cls, name", [(ModelConfig, "pad_object"), (ModelConfig, "probe_scale"),
                                       (TrainingConfig, "positions_provided")])
def test_options_that_changed_nothing_are_gone(cls, name):
    """They were validated and saved into bundles but read by nothing: a setting that does nothing is a trap."""
    with pytest.raises(TypeError, match=name):
        cls(**{name: 1})
    assert name not in DEFAULTS and legacy_key(name) not in DEFAULTS


# --------------------------------------------------------------------------- frozen


@pytest.mark.parametrize(
    "obj, field_name, value",
    [
        (ModelConfig(), "N", 128),
        (TrainingConfig(), "nepochs", 1),
        (TrainingConfig(), "model", ModelConfig(N=128)),
    ],
)
def test_configs_are_frozen(obj, field_name, value):
    before = getattr(obj, field_name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field_name, value)
    assert getattr(obj, field_name) == before


def test_replace_revalidates():
    with pytest.raises(ValueError, match="N must be one of"):
        dataclasses.replace(ModelConfig(), N=96)
    assert dataclasses.replace(ModelConfig(), N=128).N == 128


# --------------------------------------------------------------------------- update_legacy_dict


def test_update_legacy_dict_maps_names():
    model = ModelConfig(N=128, gridsize=2, object_big=False, probe_big=False, probe_mask=True,
                        intensity_scale_trainable=False, probe_trainable=True)
    cfg = TrainingConfig(model=model, output_dir=Path("/tmp/somewhere"), train_data_file=Path("train.npz"),
                         test_data_file="test.npz", nepochs=7, batch_size=4)
    target: dict = {}
    out = update_legacy_dict(target, cfg)
    assert out is target  # in place, and returned
    assert target["object.big"] is False
    assert target["probe.big"] is False
    assert target["probe.mask"] is True
    assert target["intensity_scale.trainable"] is False
    assert target["probe.trainable"] is True
    assert target["output_prefix"] == "/tmp/somewhere" and isinstance(target["output_prefix"], str)
    assert target["train_data_file_path"] == "train.npz" and isinstance(target["train_data_file_path"], str)
    assert target["test_data_file_path"] == "test.npz"
    # nested model fields are flattened to top-level keys
    assert target["N"] == 128 and target["gridsize"] == 2
    assert target["nepochs"] == 7 and target["batch_size"] == 4
    # dataclass names that were mapped do not appear under their dataclass name
    for name in KEY_MAPPINGS:
        assert name not in target
    assert "model" not in target


def test_update_legacy_dict_skips_none_and_keeps_existing_keys():
    target = {"output_prefix": "keep_me", "train_data_file_path": "old.npz", "n_groups": 5,
              "early_stopping_patience": 3, "unrelated": 42}
    update_legacy_dict(target, TrainingConfig())  # output_dir, data files, n_groups, patience all None
    assert target["output_prefix"] == "keep_me"
    assert target["train_data_file_path"] == "old.npz"
    assert target["n_groups"] == 5
    assert target["early_stopping_patience"] == 3
    assert target["unrelated"] == 42
    assert None not in [target[k] for k in ("N", "gridsize", "batch_size")]


def test_update_legacy_dict_skips_uncomputed_intensity_scale():
    target = {"intensity_scale": 12.5}
    update_legacy_dict(target, ModelConfig())  # intensity_scale 0 means "compute it"
    assert target["intensity_scale"] == 12.5
    update_legacy_dict(target, ModelConfig(intensity_scale=3.0))
    assert target["intensity_scale"] == 3.0


def test_update_legacy_dict_on_live_cfg():
    update_legacy_dict(params.cfg, TrainingConfig(model=ModelConfig(N=256, n_filters_scale=1), batch_size=8,
                                                  output_dir="inf_out"))
    assert params.cfg["N"] == 256
    assert params.cfg["n_filters_scale"] == 1
    assert params.cfg["batch_size"] == 8
    assert params.cfg["output_prefix"] == "inf_out"
    assert params.cfg["train_data_file_path"] is None  # None skipped: the default stays


def test_legacy_key():
    assert legacy_key("object_big") == "object.big"
    assert legacy_key("output_dir") == "output_prefix"
    assert legacy_key("N") == "N"
    assert legacy_key("nepochs") == "nepochs"


def test_config_to_flat_dict_flattens_model():
    flat = config_to_flat_dict(TrainingConfig(model=ModelConfig(gridsize=3), nepochs=2))
    assert flat["gridsize"] == 3 and flat["nepochs"] == 2
    assert "model" not in flat
    expected = {f.name for f in dataclasses.fields(ModelConfig)} | {
        f.name for f in dataclasses.fields(TrainingConfig) if f.name != "model"}
    assert set(flat) == expected


# --------------------------------------------------------------------------- model_config_from_params


@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(),
        ModelConfig(N=128, gridsize=2, n_filters_scale=1, amp_activation="softplus", output_mode="real_imag",
                    object_big=False, probe_big=False, probe_mask=True,
                    intensity_scale=7.0, intensity_scale_trainable=False, probe_trainable=True),
        ModelConfig(N=256, gridsize=3, amp_activation="relu"),
    ],
)
def test_model_config_from_params_inverts_update(model):
    legacy = update_legacy_dict({}, TrainingConfig(model=model))
    assert model_config_from_params(legacy) == model


def test_model_config_from_params_reads_legacy_names_and_ignores_none():
    p = dict(DEFAULTS)
    p.update({"object.big": False, "probe.mask": True, "intensity_scale": None, "N": 128})
    m = model_config_from_params(p)
    assert m.object_big is False and m.probe_mask is True and m.N == 128
    assert m.intensity_scale == 0.0  # None → not set → default


def test_model_config_from_params_validates():
    with pytest.raises(ValueError, match="gridsize must be one of"):
        model_config_from_params({"gridsize": 5})


# --------------------------------------------------------------------------- params.cfg defaults


def test_cfg_has_ptychopinn_default_keys():
    expected = {
        "N": 64, "gridsize": 1, "n_filters_scale": 2, "output_mode": "amp_phase",
        "object.big": True, "probe.big": True, "probe.mask": False, "probe.trainable": False,
        "amp_activation": "sigmoid", "nphotons": 1e9,
        "intensity_scale": None, "intensity_scale.trainable": True,
        "probe": None, "batch_size": 16,
        "nepochs": 50, "learning_rate": 1e-3, "nll_weight": 1.0, "mae_weight": 0.0,
        "output_prefix": "outputs", "train_data_file_path": None, "test_data_file_path": None,
    }
    for key, value in expected.items():
        assert key in params.cfg, key
        assert params.cfg[key] == value, key


def test_cfg_defaults_agree_with_dataclass_defaults():
    """Every key both the defaults and a default TrainingConfig write must hold the same value."""
    written = update_legacy_dict({}, TrainingConfig())
    shared = set(written) & set(DEFAULTS)
    assert {"N", "gridsize", "object.big", "probe.big", "probe.mask", "nphotons", "batch_size"} <= shared
    for key in shared:
        assert written[key] == DEFAULTS[key], key
    assert model_config_from_params(DEFAULTS) == ModelConfig()


def test_reset_cfg_restores_defaults_and_deep_copies():
    params.cfg["N"] = 256
    params.cfg["probe"] = [1, 2, 3]
    del params.cfg["nphotons"]
    params.reset_cfg()
    assert params.cfg == DEFAULTS
    assert params.cfg is not DEFAULTS


def test_restore_params_overwrites_and_copies():
    import numpy as np

    probe = np.ones((2, 2), np.complex64)
    bundle = {"N": 128, "gridsize": 2, "probe": probe}
    restore_params(params.cfg, bundle)
    assert params.cfg["N"] == 128 and params.cfg["gridsize"] == 2
    assert params.cfg["probe"] is not probe
    probe[0, 0] = 5
    assert params.cfg["probe"][0, 0] == 1
