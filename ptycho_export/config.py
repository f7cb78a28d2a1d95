"""Typed, validated configuration for models and training.

Frozen dataclasses so a config cannot drift after a model was built from it;
validation in ``__post_init__`` so a bad value fails where it is written, with
a message that names the field and the values it may take.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

ALLOWED_N = (64, 128, 256)
ALLOWED_GRIDSIZE = (1, 2, 3)
AMP_ACTIVATIONS = ("sigmoid", "swish", "silu", "softplus", "relu")
OUTPUT_MODES = ("amp_phase", "real_imag")
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("plateau", "cosine", "constant")


def _require_choice(name: str, value: Any, allowed: tuple) -> None:
    if all(isinstance(a, int) for a in allowed):  # 64.0 and True are not valid choices of 64 or 1
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) in allowed
    else:
        ok = isinstance(value, str) and value in allowed
    if not ok:
        shown = ", ".join(repr(a) if isinstance(a, str) else str(a) for a in allowed)
        raise ValueError(f"{name} must be one of {shown} (got {value!r})")


def _require_positive(name: str, value: Any, integer: bool = False, allow_zero: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'} (got {value!r})")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} (got {value!r})")


def _require_fraction(name: str, value: float) -> None:
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1) (got {value!r})")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and physics of a PtychoPINN model (everything needed to rebuild it)."""

    N: int = 64
    gridsize: int = 1
    n_filters_scale: int = 2
    amp_activation: str = "sigmoid"
    output_mode: str = "amp_phase"
    object_big: bool = True
    probe_big: bool = True
    probe_mask: bool = False
    intensity_scale: float = 0.0  # 0 → computed from nphotons when the model is built
    intensity_scale_trainable: bool = True
    probe_trainable: bool = False
    # Feed the U-Net the probe-phase back-projection O₀ of each pattern as two more input channels
    # (model.BackProjection); with output_mode "real_imag" the network's output is a correction added to O₀.
    input_backprojection: bool = False

    def __post_init__(self) -> None:
        _require_choice("N", self.N, ALLOWED_N)
        _require_choice("gridsize", self.gridsize, ALLOWED_GRIDSIZE)
        _require_positive("n_filters_scale", self.n_filters_scale, integer=True)
        _require_choice("amp_activation", self.amp_activation, AMP_ACTIVATIONS)
        _require_choice("output_mode", self.output_mode, OUTPUT_MODES)
        _require_positive("intensity_scale", self.intensity_scale, allow_zero=True)

    @property
    def channels(self) -> int:
        return self.gridsize**2


@dataclass(frozen=True)
class TrainingConfig:
    """How to train: data, optimiser, losses, where results go."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train_data_file: Optional[Path] = None
    test_data_file: Optional[Path] = None
    output_dir: Optional[Path] = None
    batch_size: int = 16
    nepochs: int = 50
    learning_rate: float = 1e-3
    nll_weight: float = 1.0
    mae_weight: float = 0.0
    nphotons: float = 1e9
    val_fraction: float = 0.1
    early_stopping_patience: Optional[int] = None
    lr_schedule: str = "plateau"  # "cosine": warm-up, then cosine decay over the epochs or the time budget
    lr_plateau_patience: int = 3
    lr_plateau_factor: float = 0.5
    time_budget_s: Optional[float] = None  # stop before an epoch that would not finish within the budget
    pretrain_fraction: float = 0.0  # share of the time budget for supervised pre-training (pretraining.py)
    n_groups: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    export_graphs: bool = True  # compile TorchScript/ONNX graphs into the bundle when one is written
    command: Optional[str] = None  # the command line that made this run, kept in the bundle's training summary

    def __post_init__(self) -> None:
        for name in ("output_dir", "train_data_file", "test_data_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if not isinstance(self.model, ModelConfig):
            raise ValueError(f"model must be a ModelConfig (got {type(self.model).__name__})")
        _require_positive("batch_size", self.batch_size, integer=True)
        _require_positive("nepochs", self.nepochs, integer=True)
        _require_positive("learning_rate", self.learning_rate)
        _require_positive("nll_weight", self.nll_weight, allow_zero=True)
        _require_positive("mae_weight", self.mae_weight, allow_zero=True)
        if self.nll_weight == 0 and self.mae_weight == 0:
            raise ValueError("nll_weight and mae_weight are both 0: at least one loss must have a weight > 0")
        _require_positive("nphotons", self.nphotons)
        _require_fraction("val_fraction", self.val_fraction)
        if self.early_stopping_patience is not None:
            _require_positive("early_stopping_patience", self.early_stopping_patience, integer=True)
        _require_positive("lr_plateau_patience", self.lr_plateau_patience, integer=True)
        _require_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.time_budget_s is not None:
            _require_positive("time_budget_s", self.time_budget_s)
        _require_fraction("pretrain_fraction", self.pretrain_fraction)
        if self.pretrain_fraction > 0 and self.time_budget_s is None:
            raise ValueError("pretrain_fraction is a share of the time budget: set time_budget_s as well")
        if not (0.0 < self.lr_plateau_factor < 1.0):
            raise ValueError(f"lr_plateau_factor must be in (0, 1) (got {self.lr_plateau_factor!r})")
        if self.n_groups is not None:
            _require_positive("n_groups", self.n_groups, integer=True)
        _require_choice("device", self.device, DEVICES)


def config_to_flat_dict(config: Any) -> dict[str, Any]:
    """Flatten a config (nested ModelConfig included) to {field_name: value}."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, ModelConfig):
            out.update(config_to_flat_dict(value))
        else:
            out[f.name] = value
    return out

