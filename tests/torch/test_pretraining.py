"""Supervised pre-training: the loss ignores exactly one constant phase per group, and training runs in budget."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402

from ptycho_export import params  # noqa: E402
from ptycho_export.data import make_groups  # noqa: E402
from ptycho_export.data.realistic import realistic_scan  # noqa: E402
from ptycho_export.model import create_torch_model_with_gridsize  # noqa: E402
from ptycho_export.pretraining import SyntheticScans, phase_invariant_loss, pretrain_supervised  # noqa: E402
from ptycho_export.training import cosine_lr  # noqa: E402


def _loss(pred, true, w):
    return float(phase_invariant_loss(pred.real, pred.imag, true.real, true.imag, w))


def test_loss_is_blind_to_a_group_phase_only():
    rng = np.random.default_rng(0)
    true = torch.from_numpy((rng.uniform(0.5, 1, (3, 4, 8, 8)) * np.exp(1j * rng.uniform(-1, 1, (3, 4, 8, 8))))
                            .astype(np.complex64))
    w = torch.ones(8, 8)
    assert _loss(true, true, w) < 1e-10
    group_phase = torch.exp(1j * torch.tensor([0.3, -2.0, 1.0]))[:, None, None, None]
    assert _loss(true * group_phase, true, w) < 1e-10
    patch_phase = torch.exp(1j * torch.tensor([0.0, 0.5, 0.0, -0.5]))[None, :, None, None]
    assert _loss(true * patch_phase, true, w) > 1e-2  # relative phases inside a group are measurable
    assert _loss(true * 0.9, true, w) > 1e-3


def test_cosine_lr_warms_up_then_decays():
    assert cosine_lr(1.0, 0.0) == pytest.approx(0.1)
    assert cosine_lr(1.0, 0.03) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.03)) * 0.98 + 0.02)
    assert cosine_lr(1.0, 1.0) == pytest.approx(0.02) and cosine_lr(1.0, 5.0) == pytest.approx(0.02)


def test_pretraining_runs_in_its_budget_and_trains_the_network():
    data = realistic_scan(n_positions=40, seed=3)
    groups = make_groups(data, 2)
    scans = SyntheticScans(data.probe, data.nphotons, groups, seed=1)
    diff, truth = scans.batch(4)
    assert diff.shape == truth.shape == (4, 4, 64, 64) and np.all(diff >= 0)
    scale = math.sqrt(data.nphotons) / 32
    p = dict(params.DEFAULTS, n_filters_scale=1, intensity_scale=scale, probe=data.probe, output_mode="real_imag",
             input_backprojection=True)
    d2o = create_torch_model_with_gridsize(2, 64, p)["diffraction_to_obj"]
    result = pretrain_supervised(d2o, scans, scale, time_budget_s=8.0, batch_size=4, log_every_s=2.0)
    assert result["steps"] >= 3 and 8.0 <= result["wall_time_s"] < 20.0
    assert len(result["loss"]) >= 2 and all(np.isfinite(result["loss"]))
    # the residual heads start at exactly zero (the model starts at the back-projection); training moved them
    assert float(d2o.generator.decoder_a.central.weight.abs().max()) > 0
    assert d2o.generator.encoder.stages[0].conv1.weight.is_contiguous()  # back in the default layout for export
