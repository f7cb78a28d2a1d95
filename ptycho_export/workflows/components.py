"""Training and inference workflows with PtychoPINN's names and call shapes.

``save_torch_bundle`` and ``load_torch_bundle`` are imported as module
attributes on purpose: tests (and users) can monkeypatch them here.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ptycho_runtime.reconstruction.alignment import stitch_scan
from ptycho_runtime.reconstruction.stitching import probe_window

from .. import params
from ..config import TrainingConfig
from ..data import PtychoData, load_npz, make_groups
from ..model import build_models, default_intensity_scale
from ..model_manager import load_torch_bundle, save_torch_bundle
from ..training import predict_patches, resolve_device, seed_everything, stderr_log, train_autoencoder

DataLike = Union[PtychoData, str, os.PathLike]


def _as_data(data: Optional[DataLike]) -> Optional[PtychoData]:
    if data is None or isinstance(data, PtychoData):
        return data
    return load_npz(data)


def train_cdi_model_torch(train_data: DataLike, test_data: Optional[DataLike], config: TrainingConfig
                          ) -> dict[str, Any]:
    """Group the scan, build both networks from ``config.model`` and train the autoencoder.

    ``params.cfg`` is synced with the config first (CONFIG-001, for
    PtychoPINN-era code that reads it during training); the models are built
    from the explicit config, not from it.

    Returns ``history``, ``models``, ``intensity_scale`` (the input scale of
    the normalisation contract), ``train_container``, ``test_container``
    (GroupedData), ``probe`` and ``training_summary``.
    """
    train = _as_data(train_data)
    test = _as_data(test_data)
    if train is None:
        raise ValueError("train_data is required (a PtychoData or a path to a PtychoPINN NPZ file)")
    mcfg = config.model
    if train.N != mcfg.N:
        raise ValueError(f"the training data has N={train.N} but config.model.N={mcfg.N}; they must match")
    seed_everything(config.seed)
    params.update_legacy_dict(params.cfg, config)  # CONFIG-001: params.cfg follows the config being trained
    intensity_scale = mcfg.intensity_scale or default_intensity_scale(config.nphotons, mcfg.N)
    probe = train.probe.astype(np.complex64)
    params.cfg["intensity_scale"] = float(intensity_scale)
    params.cfg["probe"] = probe.copy()

    train_container = make_groups(train, mcfg.gridsize, seed=config.seed, n_groups=config.n_groups)
    test_container = make_groups(test, mcfg.gridsize, seed=config.seed) if test is not None else None
    models = build_models(mcfg, probe, intensity_scale)
    device = resolve_device(config.device)
    pretrain_summary = None
    if config.pretrain_fraction > 0:
        pretrain_summary = _pretrain(models["diffraction_to_obj"], train, train_container, intensity_scale, config,
                                     device)
        config = replace(config, time_budget_s=config.time_budget_s - pretrain_summary["wall_time_s"],
                         pretrain_fraction=0.0)
    run = train_autoencoder(models["autoencoder"], train_container, intensity_scale, config, device)
    for m in models.values():
        m.to("cpu").eval()
    summary = {k: v for k, v in run.items() if k != "history"}
    if config.command:
        summary["command"] = config.command
    if pretrain_summary is not None:
        summary["pretraining"] = {k: v for k, v in pretrain_summary.items() if k != "loss"}
    return {"history": run["history"], "models": models, "intensity_scale": float(intensity_scale),
            "train_container": train_container, "test_container": test_container,
            "probe": probe, "training_summary": summary, "physics": train.physics}


def _pretrain(d2o, train: PtychoData, container, intensity_scale: float, config: TrainingConfig, device
              ) -> dict[str, Any]:
    """Supervised pre-training on synthetic objects seen through this scan's probe, geometry and photons."""
    from ..pretraining import SyntheticScans, pretrain_supervised

    scans = SyntheticScans(train.probe, config.nphotons, container, seed=config.seed)
    budget = config.time_budget_s * config.pretrain_fraction
    return pretrain_supervised(d2o, scans, intensity_scale, budget, batch_size=config.batch_size,
                               learning_rate=config.learning_rate, device=device,
                               log=stderr_log if config.progress else None,
                               log_every_s=min(30.0, max(5.0, budget / 10)))  # about ten lines per run


def reconstruct_container(d2o, container, intensity_scale: float, batch_size: int = 64,
                          probe: Optional[np.ndarray] = None):
    """Eager prediction of a grouped scan, stitched as the runtime's ``reconstruct`` does (|probe|² window)."""
    patches = predict_patches(d2o, container.diffraction, intensity_scale, batch_size)
    window = None if probe is None else probe_window(probe)
    return stitch_scan(patches, container.positions, window=window), patches


def run_cdi_example_torch(train_data: DataLike, test_data: Optional[DataLike], config: TrainingConfig,
                          do_stitching: bool = False
                          ) -> tuple[Optional[np.ndarray], Optional[np.ndarray], dict[str, Any]]:
    """Train (after syncing ``params.cfg`` with the config), persist, and optionally stitch the test scan.

    Returns ``(recon_amp, recon_phase, results)``; the amplitude and phase are
    2-D arrays with ``do_stitching=True`` and a test scan, else ``None, None``.
    With ``config.output_dir`` set, the bundle is written to
    ``output_dir / "wts.h5"`` and ``results["bundle_path"]`` names it.
    """
    params.update_legacy_dict(params.cfg, config)
    results = train_cdi_model_torch(train_data, test_data, config)
    if config.output_dir is not None:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        bundle_path = config.output_dir / "wts.h5"
        save_torch_bundle(results["models"], bundle_path, config, intensity_scale=results["intensity_scale"],
                          probe=results["probe"], history=results["history"],
                          training_summary=results["training_summary"], physics=results.get("physics"))
        results["bundle_path"] = bundle_path
        if config.export_graphs:
            from ..export import add_graphs_to_bundle

            results["export_summary"] = add_graphs_to_bundle(bundle_path)
    recon_amp = recon_phase = None
    if do_stitching and results["test_container"] is not None:
        start = time.perf_counter()
        recon, _ = reconstruct_container(results["models"]["diffraction_to_obj"], results["test_container"],
                                         results["intensity_scale"], probe=results["probe"])
        results["reconstruction"] = recon
        results["reconstruction_time_s"] = time.perf_counter() - start
        recon_amp, recon_phase = recon.amplitude, recon.phase
    return recon_amp, recon_phase, results


def load_inference_bundle_torch(bundle_dir: Union[str, os.PathLike]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``bundle_dir / "wts.h5"`` for inference; ``params.cfg`` is restored on the way (CONFIG-001)."""
    model, bundle_params = load_torch_bundle(Path(bundle_dir) / "wts.h5", model_name="diffraction_to_obj")
    return {"diffraction_to_obj": model}, bundle_params
