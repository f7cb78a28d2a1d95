"""Supervised pre-training on objects simulated with the user's own probe, scan geometry and photon count.

Physics-only training (the Poisson likelihood through the autoencoder) learns
slowly: in a CPU budget the network stays far above the noise floor of its own
training scan (``docs/fidelity.md``). The experiment itself is known, though:
the probe, the photon count and the scan's neighbour geometry are in the
user's file. So we can simulate as many diffraction patterns as we like *for
that experiment*, from a broad family of synthetic objects (dead leaves,
Gaussian random fields, lines — different sizes, contrasts and phase ranges),
and train ``diffraction_to_obj`` on them with the true patches as targets,
which converges far faster. Physics training on the user's own scan then
adapts the network to the real sample.

The supervised loss ignores each group's constant phase: diffraction cannot
determine it (ψ and ψ·e^{iφ} scatter identically), so asking the network for
it would only teach it to guess. Neighbouring patches are put
on one phase when they are stitched (``ptycho_runtime.alignment``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .data import GroupedData, extract_patches, far_field_amplitude, intensity_scale_from_nphotons, make_object
from .data.realistic import dead_leaves_object
from .training import channels_last, cosine_lr

POOL_OBJECT_SIZE = 192


def object_pool(seed: int, count: int = 12, size: int = POOL_OBJECT_SIZE) -> list[np.ndarray]:
    """Synthetic objects of several families and contrasts, complex64 [size, size] each.

    Phase ranges span 0.3–1.5 rad, amplitudes 0.5–1: a prior broad enough not
    to be a copy of any one test object.
    """
    rng = np.random.default_rng(seed)
    pool = []
    for k in range(count):
        kind = ("dead_leaves", "grf", "lines")[k % 3]
        s = int(rng.integers(0, 2**31))
        if kind == "dead_leaves":
            obj = dead_leaves_object(size, s, max_phase=float(rng.uniform(0.3, 1.5)),
                                     r_max=float(rng.uniform(10, 50)))
        else:
            obj = make_object(kind, size, s)
            phase = np.angle(obj) * float(rng.uniform(0.4, 1.8))
            amp = 1.0 - (1.0 - np.abs(obj)) * float(rng.uniform(0.3, 1.2))
            obj = (np.clip(amp, 0.3, 1.0) * np.exp(1j * phase)).astype(np.complex64)
        pool.append(obj.astype(np.complex64))
    return pool


class SyntheticScans:
    """Draws supervised batches: (normalised diffraction [B, C, N, N], true patches [B, C, N, N]).

    Each group copies the neighbour offsets of a random group of the user's
    own scan (``template``), so gridsize > 1 sees the real overlap geometry,
    placed at a random spot of a random pool object, flipped/rotated at random.
    Counts are Poisson at ``nphotons`` per frame through ``probe`` (the probe
    in the normalised units of the user's data, see ``read_npz_arrays``).
    """

    def __init__(self, probe: np.ndarray, nphotons: float, template: GroupedData, seed: int = 0,
                 pool: Optional[list[np.ndarray]] = None) -> None:
        self.probe = np.asarray(probe, np.complex64)
        self.N = self.probe.shape[-1]
        self.scale = intensity_scale_from_nphotons(nphotons, self.N)
        self.offsets = template.offsets[:, :, 0, :].astype(np.float64)  # [G, C, 2]
        self.rng = np.random.default_rng(seed)
        self.pool = pool if pool is not None else object_pool(seed)

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        N, C = self.N, self.offsets.shape[1]
        diff = np.empty((size, C, N, N), np.float32)
        truth = np.empty((size, C, N, N), np.complex64)
        for b in range(size):
            obj = self.pool[self.rng.integers(len(self.pool))]
            obj = np.rot90(obj, int(self.rng.integers(4)))
            if self.rng.integers(2):
                obj = obj[:, ::-1]
            off = self.offsets[self.rng.integers(len(self.offsets))]
            margin = (N - 1) / 2 + np.abs(off).max() + 1
            cx, cy = self.rng.uniform(margin, obj.shape[0] - 1 - margin, 2)
            truth[b] = extract_patches(np.ascontiguousarray(obj), cx + off[:, 0], cy + off[:, 1], N)
        expected = (far_field_amplitude(truth, self.probe).astype(np.float64) * self.scale) ** 2
        diff[:] = np.sqrt(self.rng.poisson(expected)) / self.scale
        return diff, truth


def phase_invariant_loss(pred_re: Tensor, pred_im: Tensor, true_re: Tensor, true_im: Tensor,
                         weight: Tensor) -> Tensor:
    """Mean over groups of min_φ Σ w |pred·e^{iφ} − true|² / (C Σ w): one free constant phase per group.

    Tensors are [B, C, N, N]. The phase is shared by the group's C patches:
    their *relative* phases are measurable (they overlap, and the overlap
    constraint averages them), only the group's common phase is not.
    """
    dims = (-3, -2, -1)
    cross_re = torch.sum(weight * (true_re * pred_re + true_im * pred_im), dim=dims)
    cross_im = torch.sum(weight * (true_im * pred_re - true_re * pred_im), dim=dims)
    norm = torch.sqrt(cross_re**2 + cross_im**2).clamp_min(1e-12)
    c = (cross_re / norm)[:, None, None, None]  # e^{iφ} with φ = angle(Σ w·true·conj(pred))
    s = (cross_im / norm)[:, None, None, None]
    rot_re = pred_re * c - pred_im * s
    rot_im = pred_re * s + pred_im * c
    err = (rot_re - true_re) ** 2 + (rot_im - true_im) ** 2
    return torch.mean(torch.sum(weight * err, dim=dims) / (pred_re.shape[1] * torch.sum(weight)))


def pretrain_supervised(d2o: nn.Module, scans: SyntheticScans, intensity_scale: float, time_budget_s: float,
                        batch_size: int = 16, learning_rate: float = 1e-3, device: str | torch.device = "cpu",
                        log: Optional[Callable[[str], None]] = None, log_every_s: float = 30.0
                        ) -> dict[str, Any]:
    """Train ``d2o`` on synthetic batches for ``time_budget_s`` seconds (Adam, warm-up + cosine decay).

    Returns ``{"steps", "wall_time_s", "loss"}`` (loss per logged interval).
    """
    device = torch.device(device)
    channels_last(d2o.to(device)).train()
    weight = torch.from_numpy((np.abs(scans.probe) ** 2 / np.max(np.abs(scans.probe) ** 2)).astype(np.float32))
    weight = weight.to(device)
    params = [p for name, p in d2o.named_parameters() if p.requires_grad and "scaler" not in name]
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    start = last_log = time.perf_counter()
    steps, running, seen, losses = 0, 0.0, 0, []
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= time_budget_s:
            break
        lr = cosine_lr(learning_rate, elapsed / time_budget_s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        diff, truth = scans.batch(batch_size)
        x = torch.from_numpy(diff * np.float32(intensity_scale)).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        a, b = d2o.forward_parts(x)
        re, im = d2o.to_real_imag(a, b)
        t = torch.from_numpy(truth).to(device)
        loss = phase_invariant_loss(re, im, t.real, t.imag, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        running += float(loss.detach())
        seen += 1
        now = time.perf_counter()
        if now - last_log >= log_every_s:
            losses.append(running / seen)
            if log is not None:
                log(f"pre-training step {steps}  loss {running / seen:.4g}  lr {lr:.2e}  "
                    f"elapsed {int(now - start) // 60}:{int(now - start) % 60:02d}")
            running, seen, last_log = 0.0, 0, now
    channels_last(d2o, False).eval()
    return {"steps": steps, "wall_time_s": time.perf_counter() - start, "loss": losses}
