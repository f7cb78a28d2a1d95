"""The eager PyTorch training loop (no Lightning): Adam, LR reduction on plateau,
optional early stopping, a validation split, seeded, CPU or CUDA.

Inputs follow PtychoPINN's contract: the stored diffraction is the normalised
amplitude X; the model is fed ``X · intensity_scale`` (photon units) and
learns to reproduce the measured intensity ``(X · intensity_scale)²`` through
the physics, with a Poisson likelihood (and/or MAE on amplitudes).
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .config import TrainingConfig
from .data import GroupedData
from .physics import amplitude_mae, poisson_nll


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but torch sees no CUDA device "
                           "(CPU-only torch build or no GPU); use device='cpu' or 'auto'.")
    return torch.device(name)


def loss_terms(autoencoder: nn.Module, x: torch.Tensor, offsets: torch.Tensor, config: TrainingConfig
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted Poisson NLL on intensities + MAE on amplitudes, for one batch in photon units."""
    _, pred_amp, pred_int = autoencoder(x, offsets)
    total = torch.zeros((), device=x.device)
    parts: dict[str, float] = {}
    if config.nll_weight > 0:
        nll = poisson_nll(pred_int, x * x)
        total = total + config.nll_weight * nll
        parts["nll"] = float(nll.detach())
    if config.mae_weight > 0:
        mae = amplitude_mae(pred_amp, x)
        total = total + config.mae_weight * mae
        parts["mae"] = float(mae.detach())
    return total, parts


def _tensors(data: GroupedData, scale: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(data.diffraction, dtype=np.float32) * np.float32(scale))
    off = torch.from_numpy(np.ascontiguousarray(data.offsets, dtype=np.float32))
    return x.to(device), off.to(device)


def _evaluate(autoencoder: nn.Module, x: torch.Tensor, off: torch.Tensor, config: TrainingConfig) -> float:
    autoencoder.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], config.batch_size):
            loss, _ = loss_terms(autoencoder, x[i:i + config.batch_size], off[i:i + config.batch_size], config)
            n = min(config.batch_size, x.shape[0] - i)
            total += float(loss) * n
            count += n
    return total / max(count, 1)


def train_autoencoder(autoencoder: nn.Module, data: GroupedData, intensity_scale: float, config: TrainingConfig,
                      device: Optional[torch.device] = None) -> dict[str, Any]:
    """Train in place; return the history (per-epoch loss, val_loss, lr, loss parts) and timing."""
    device = device or resolve_device(config.device)
    seed_everything(config.seed)
    autoencoder.to(device)
    x, off = _tensors(data, intensity_scale, device)
    n = x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    n_val = int(round(n * config.val_fraction)) if n > 1 else 0
    n_val = min(n_val, n - 1)
    val_idx, train_idx = order[:n_val], order[n_val:]
    x_tr, off_tr = x[train_idx.to(device)], off[train_idx.to(device)]
    x_val, off_val = x[val_idx.to(device)], off[val_idx.to(device)]

    trainable = [p for p in autoencoder.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_plateau_factor, patience=config.lr_plateau_patience)
    history: dict[str, list[float]] = {"loss": [], "val_loss": [], "lr": []}
    best, best_state, stale = math.inf, None, 0
    shuffle_gen = torch.Generator().manual_seed(config.seed + 1)
    start = time.perf_counter()

    progress = None
    if config.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.nepochs, desc="training", unit="epoch")
    for epoch in range(config.nepochs):
        autoencoder.train()
        perm = torch.randperm(x_tr.shape[0], generator=shuffle_gen).to(device)
        running, seen, parts_sum = 0.0, 0, {}
        for i in range(0, x_tr.shape[0], config.batch_size):
            idx = perm[i:i + config.batch_size]
            loss, parts = loss_terms(autoencoder, x_tr[idx], off_tr[idx], config)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {float(loss.detach())} at epoch {epoch + 1}; lower learning_rate "
                    f"(now {optimizer.param_groups[0]['lr']:g}) or check the data for NaN/inf")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach()) * idx.numel()
            seen += idx.numel()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * idx.numel()
        train_loss = running / max(seen, 1)
        val_loss = _evaluate(autoencoder, x_val, off_val, config) if n_val else train_loss
        scheduler.step(val_loss)
        history["loss"].append(train_loss)
        history["val_loss"].append(val_loss)
        history["lr"].append(optimizer.param_groups[0]["lr"])
        for k, v in parts_sum.items():
            history.setdefault(k, []).append(v / max(seen, 1))
        if progress is not None:
            progress.set_postfix(loss=f"{train_loss:.4g}", val=f"{val_loss:.4g}")
            progress.update(1)
        if val_loss < best:
            best, stale = val_loss, 0
            if config.early_stopping_patience is not None:
                best_state = {k: v.detach().clone() for k, v in autoencoder.state_dict().items()}
        else:
            stale += 1
            if config.early_stopping_patience is not None and stale >= config.early_stopping_patience:
                break
    if progress is not None:
        progress.close()
    if best_state is not None:
        autoencoder.load_state_dict(best_state)
    autoencoder.eval()
    return {"history": history, "epochs_run": len(history["loss"]), "wall_time_s": time.perf_counter() - start,
            "n_train": int(x_tr.shape[0]), "n_val": int(n_val), "device": str(device)}


def predict_patches(d2o: nn.Module, diffraction: np.ndarray, intensity_scale: float, batch_size: int = 64,
                    device: Optional[torch.device] = None) -> np.ndarray:
    """Eager inference: normalised diffraction [B, C, N, N] → complex64 patches [B, C, N, N]."""
    device = device or next(d2o.parameters()).device
    d2o.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, diffraction.shape[0], batch_size):
            xb = np.asarray(diffraction[i:i + batch_size], dtype=np.float32) * np.float32(intensity_scale)
            out.append(d2o(torch.from_numpy(xb).to(device)).cpu().numpy())
    return np.concatenate(out).astype(np.complex64)
