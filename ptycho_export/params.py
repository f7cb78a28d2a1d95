"""The legacy flat ``params.cfg`` dict that PtychoPINN code and users rely on.

Much PtychoPINN-era code reads settings from a module-level dict rather than
from the config objects. We keep that dict (PtychoPINN's flat key names and
defaults, for every key this code uses: keys that would change nothing here,
such as ``pad_object`` or ``probe_scale``, are left out rather than saved
into bundles as if they mattered) and one mapping from dataclass fields onto
it, so both worlds agree. Rule
CONFIG-001: the params a bundle was trained with are written back into this
dict *before* a model is rebuilt from the bundle.
"""

from __future__ import annotations

import copy
import os
from dataclasses import fields
from typing import Any

from .config import ModelConfig, config_to_flat_dict

# Defaults follow PtychoPINN's; intensity_scale and probe are filled in by training. Only keys something reads.
DEFAULTS: dict[str, Any] = {
    "N": 64,
    "gridsize": 1,
    "n_filters_scale": 2,
    "output_mode": "amp_phase",
    "object.big": True,
    "probe.big": True,
    "probe.mask": False,
    "probe.trainable": False,
    "input_backprojection": False,
    "amp_activation": "sigmoid",
    "nphotons": 1e9,
    "intensity_scale": None,
    "intensity_scale.trainable": True,
    "probe": None,
    "batch_size": 16,
    "nepochs": 50,
    "learning_rate": 1e-3,
    "nll_weight": 1.0,
    "mae_weight": 0.0,
    "output_prefix": "outputs",
    "train_data_file_path": None,
    "test_data_file_path": None,
}

# Dataclass field → legacy key, where the names differ (PtychoPINN's table).
KEY_MAPPINGS: dict[str, str] = {
    "object_big": "object.big",
    "probe_big": "probe.big",
    "probe_mask": "probe.mask",
    "probe_trainable": "probe.trainable",
    "intensity_scale_trainable": "intensity_scale.trainable",
    "output_dir": "output_prefix",
    "train_data_file": "train_data_file_path",
    "test_data_file": "test_data_file_path",
}

cfg: dict[str, Any] = copy.deepcopy(DEFAULTS)


def legacy_key(field_name: str) -> str:
    """The params.cfg key a dataclass field is stored under."""
    return KEY_MAPPINGS.get(field_name, field_name)


def update_legacy_dict(target: dict[str, Any], config: Any) -> dict[str, Any]:
    """Write a config's fields into a legacy params dict (in place) and return it.

    Nested ModelConfig fields are flattened; names are mapped with KEY_MAPPINGS;
    None values are skipped (they mean "not set", not "erase"); paths become
    strings. ``intensity_scale == 0`` in a ModelConfig means "compute it", so it
    is skipped too.
    """
    for name, value in config_to_flat_dict(config).items():
        if value is None:
            continue
        if name == "intensity_scale" and value == 0:
            continue
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        target[legacy_key(name)] = value
    return target


def reset_cfg() -> None:
    """Restore PtychoPINN defaults (tests use this to start clean)."""
    cfg.clear()
    cfg.update(copy.deepcopy(DEFAULTS))


def restore_params(target: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """CONFIG-001: overwrite ``target`` with a bundle's params (all keys, arrays included)."""
    target.update(copy.deepcopy(params))
    return target


def model_config_from_params(params: dict[str, Any]) -> ModelConfig:
    """Rebuild a ModelConfig from a legacy params dict (the inverse of ``update_legacy_dict``).

    It lives here, not in ``config.py``, because it is the legacy key mapping's
    inverse: ``config`` knows nothing of params.cfg, so imports go one way.
    """
    kwargs = {}
    for f in fields(ModelConfig):
        key = legacy_key(f.name)
        if key in params and params[key] is not None:
            kwargs[f.name] = params[key]
    return ModelConfig(**kwargs)
