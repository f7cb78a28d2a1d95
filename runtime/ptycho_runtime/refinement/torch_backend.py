"""The torch backend: the numpy reference's batch update in torch (CPU or CUDA), torch imported only here.

The canvas, probe and momentum live on the device for the whole refinement;
the host sends each batch's window corners and amplitudes (the amplitudes are
moved to the device once, when the first batch asks) and reads the misfit
back once per sweep, so a CUDA run does not synchronise per batch.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .numpy_backend import TINY


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise ValueError("backend='torch' needs PyTorch: install ptycho-runtime[torch], "
                         "or use backend='onnx' / 'numpy'") from exc
    return torch


class TorchBackend:
    """The state of ``NumpyBackend`` as torch tensors on ``device``; the same update, term for term."""

    name = "torch"

    def __init__(self, obj: np.ndarray, probe: np.ndarray, *, device: str = "cpu", alpha: float,
                 probe_alpha: float, refine_probe: bool, step: float = 1.0) -> None:
        torch = _torch()
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("backend='torch' on device='cuda' needs a CUDA build of torch and a GPU; "
                             "use device='cpu'")
        self.torch, self.device = torch, device
        self._dev = torch.device(device)
        self.obj = torch.as_tensor(np.ascontiguousarray(obj, dtype=np.complex64), device=self._dev)
        self.probe = torch.as_tensor(np.ascontiguousarray(probe, dtype=np.complex64), device=self._dev)
        self.alpha, self.probe_alpha, self.refine_probe = float(alpha), float(probe_alpha), bool(refine_probe)
        self.step = float(step)
        self.N = int(self.probe.shape[0])
        self._offsets = torch.arange(self.N + 1, device=self._dev)
        self._velocity: Optional[Any] = None
        self._before: Optional[Any] = None
        self._misfit: Optional[Any] = None
        self._measured: dict[int, Any] = {}

    def get_object(self) -> np.ndarray:
        return self.obj.cpu().numpy().copy()

    def set_object(self, obj: np.ndarray) -> None:
        self.obj = self.torch.as_tensor(np.ascontiguousarray(obj, dtype=np.complex64), device=self._dev)
        self._velocity = None

    def get_probe(self) -> np.ndarray:
        return self.probe.cpu().numpy().copy()

    def multiply_object(self, factor: np.ndarray) -> None:
        f = self.torch.as_tensor(np.ascontiguousarray(factor, dtype=np.complex64), device=self._dev)
        self.obj.mul_(f)
        if self._velocity is not None:
            self._velocity.mul_(f)

    def begin_momentum_step(self, momentum: float) -> None:
        self._before = self.obj.clone() if momentum else None

    def end_momentum_step(self, momentum: float) -> None:
        if not momentum or self._before is None:
            return
        change = self.obj - self._before
        self._velocity = change if self._velocity is None else self._velocity.mul_(momentum).add_(change)
        self.obj.add_(self._velocity, alpha=momentum)
        self._before = None

    def gain(self):
        P = self.probe
        p2 = P.abs() ** 2
        return self.step * P.conj() / ((1 - self.alpha) * p2 + self.alpha * p2.max())

    def run_batch(self, measured: np.ndarray, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray) -> float:
        torch, dev, N = self.torch, self._dev, self.N
        W = self.obj.shape[1]
        r = torch.as_tensor(rows, device=dev)
        c = torch.as_tensor(cols, device=dev)
        idx = ((r[:, None, None] + self._offsets[None, :, None]) * W + c[:, None, None]
               + self._offsets[None, None, :]).reshape(-1)
        w = torch.as_tensor(weights, device=dev)[:, :, None, None]
        A = torch.as_tensor(measured, device=dev)
        flat = self.obj.view(-1)
        s = flat.index_select(0, idx).view(-1, N + 1, N + 1)
        o = w[:, 0] * s[:, :-1, :-1] + w[:, 1] * s[:, :-1, 1:] + w[:, 2] * s[:, 1:, :-1] + w[:, 3] * s[:, 1:, 1:]
        P = self.probe
        spectrum = torch.fft.fft2(P * o)
        mag = spectrum.abs()
        misfit = torch.sum(torch.square(mag - A), dtype=torch.float64)
        dpsi = torch.fft.ifft2(spectrum * (A / mag.clamp_min(TINY) - 1))
        delta = self.gain() * dpsi
        up = torch.zeros_like(s)
        up[:, :-1, :-1] += w[:, 0] * delta
        up[:, :-1, 1:] += w[:, 1] * delta
        up[:, 1:, :-1] += w[:, 2] * delta
        up[:, 1:, 1:] += w[:, 3] * delta
        flat.index_add_(0, idx, up.reshape(-1))  # no two windows of a batch share a pixel
        if self.refine_probe:
            den = torch.sum(o.abs() ** 2, dim=0)
            a = self.probe_alpha
            self.probe = P + torch.sum(o.conj() * dpsi, dim=0) / ((1 - a) * den + a * den.max())
        self._misfit = misfit if self._misfit is None else self._misfit + misfit
        return 0.0  # the sweep's total is read by take_misfit(), once per sweep

    def take_misfit(self) -> float:
        total = 0.0 if self._misfit is None else float(self._misfit)
        self._misfit = None
        return total

    def accumulate_batch(self, *args: Any) -> float:
        raise ValueError("batching='parallel' runs on the numpy backend only: use backend='numpy'")



