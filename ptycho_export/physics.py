"""Differentiable ptychography physics in PyTorch: translation, overlap constraint,
probe illumination and the far-field (Fraunhofer) diffraction amplitude.

Everything works on real/imaginary pairs of real tensors rather than complex
tensors. Why: ``grid_sample`` has no complex support, and an exported graph
must be real-valued anyway (ONNX has no complex dtype). The far field can be
computed two ways that agree to float32 rounding: ``torch.fft`` (eager
training, fastest on CPU/GPU) or a DFT written as matrix products with
precomputed real and imaginary DFT matrices, which exports to plain MatMul
nodes that run on every onnxruntime execution provider (onnxruntime has no
GPU kernel for the ``DFT`` op).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def translate(images: Tensor, shifts: Tensor) -> Tensor:
    """Shift images by sub-pixel amounts with bilinear interpolation, zeros outside.

    ``images`` [K, ch, H, W]; ``shifts`` [K, 2] as (dx, dy) in pixels.
    ``out[k, :, y, x] = images[k, :, y - dy, x - dx]``.
    """
    K, _, H, W = images.shape
    xs = torch.arange(W, dtype=images.dtype, device=images.device)
    ys = torch.arange(H, dtype=images.dtype, device=images.device)
    x_src = xs.view(1, 1, W) - shifts[:, 0].view(K, 1, 1)
    y_src = ys.view(1, H, 1) - shifts[:, 1].view(K, 1, 1)
    grid_x = (2.0 * x_src / (W - 1) - 1.0).expand(K, H, W)
    grid_y = (2.0 * y_src / (H - 1) - 1.0).expand(K, H, W)
    grid = torch.stack([grid_x, grid_y], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def reassemble_and_extract(re: Tensor, im: Tensor, offsets: Tensor, pad: int) -> Tuple[Tensor, Tensor]:
    """The overlap constraint for gridsize > 1: merge a group's patches and cut them out again.

    The C patches of a group are placed by their offsets on a canvas padded by
    ``pad`` pixels, averaged where they overlap, and each patch is extracted
    again (bilinear, sub-pixel). Neighbouring patches thereby see one shared
    object, which is what lets the network learn from overlap. Offsets [B, C, 1, 2]
    are (x, y) in pixels relative to the group centre; |offset| should stay below
    ``pad`` or content is clipped.
    """
    B, C, N, _ = re.shape
    M = N + 2 * pad
    stacked = torch.stack([re, im, torch.ones_like(re)], dim=2).reshape(B * C, 3, N, N)
    padded = F.pad(stacked, [pad, pad, pad, pad])
    shifts = offsets.reshape(B * C, 2)
    placed = translate(padded, shifts).reshape(B, C, 3, M, M).sum(dim=1)
    weight = placed[:, 2:3].clamp_min(1e-3)
    canvas = placed[:, 0:2] / weight
    canvas = canvas.unsqueeze(1).expand(B, C, 2, M, M).reshape(B * C, 2, M, M)
    back = translate(canvas, -shifts)[:, :, pad : pad + N, pad : pad + N].reshape(B, C, 2, N, N)
    return back[:, :, 0], back[:, :, 1]


def shifted_dft_matrices(N: int) -> Tuple[np.ndarray, np.ndarray]:
    """Real and imaginary parts of L = P·W, the DFT matrix with fftshift folded into its rows.

    For a patch X, ``fftshift(fft2(X)) = L @ X @ L.T`` (W is symmetric and P the
    fftshift permutation), so the shifted 2-D DFT is four real matmuls per side.
    Computed in float64, then rounded, for the best float32 accuracy.
    """
    k = np.arange(N)
    w = np.exp(-2j * np.pi * np.outer(k, k) / N)
    shifted = np.roll(w, N // 2, axis=0)  # row k of the result is frequency k - N/2
    return shifted.real.astype(np.float32), shifted.imag.astype(np.float32)


class FarField(nn.Module):
    """|fftshift(fft2(ψ))|² / (N·N) for real/imag pairs [B, C, N, N] → intensity [B, C, N, N].

    ``use_matmul`` switches to the DFT-as-matmul form used for export. The DFT
    matrices are non-persistent buffers: they are derived from N, so they never
    enter a state_dict or a bundle's weights.
    """

    def __init__(self, N: int) -> None:
        super().__init__()
        self.N = N
        self.use_matmul = False
        lr, li = shifted_dft_matrices(N)
        self.register_buffer("dft_re", torch.from_numpy(lr), persistent=False)
        self.register_buffer("dft_im", torch.from_numpy(li), persistent=False)

    def forward(self, re: Tensor, im: Tensor) -> Tensor:
        norm = float(self.N * self.N)
        if self.use_matmul:
            lr, li = self.dft_re, self.dft_im
            # T = L @ X
            tr = torch.matmul(lr, re) - torch.matmul(li, im)
            ti = torch.matmul(lr, im) + torch.matmul(li, re)
            # Y = T @ L^T
            lrt, lit = lr.transpose(0, 1), li.transpose(0, 1)
            yr = torch.matmul(tr, lrt) - torch.matmul(ti, lit)
            yi = torch.matmul(tr, lit) + torch.matmul(ti, lrt)
            return (yr * yr + yi * yi) / norm
        spectrum = torch.fft.fft2(torch.complex(re, im))
        intensity = spectrum.real * spectrum.real + spectrum.imag * spectrum.imag
        return torch.fft.fftshift(intensity, dim=(-2, -1)) / norm


def disk_mask(N: int) -> np.ndarray:
    """A centred disk of radius N/2 (PtychoPINN's ``probe.mask``)."""
    c = (N - 1) / 2.0
    yy, xx = np.mgrid[0:N, 0:N]
    return ((yy - c) ** 2 + (xx - c) ** 2 <= (N / 2.0) ** 2).astype(np.float32)


class PhysicsForward(nn.Module):
    """Object patches → (overlap constraint) → probe illumination → far-field intensity.

    Returns the normalised intensity |F(O·P)|²/N²; the caller multiplies by
    the intensity scale² to get photon counts.
    """

    def __init__(
        self,
        N: int,
        gridsize: int,
        probe: np.ndarray,
        object_big: bool = True,
        probe_mask: bool = False,
        probe_trainable: bool = False,
    ) -> None:
        super().__init__()
        probe = np.asarray(probe)
        if probe.shape != (N, N):
            raise ValueError(f"probe must have shape ({N}, {N}) to match N={N} (got {probe.shape})")
        if not np.all(np.isfinite(probe)):
            raise ValueError("probe contains NaN or inf values; pass a finite complex probe")
        pair = torch.from_numpy(np.stack([probe.real, probe.imag]).astype(np.float32))
        if probe_trainable:
            self.probe = nn.Parameter(pair)
        else:
            self.register_buffer("probe", pair)
        mask = disk_mask(N) if probe_mask else np.ones((N, N), np.float32)
        self.register_buffer("probe_mask", torch.from_numpy(mask))
        self.N = N
        self.gridsize = gridsize
        self.use_overlap = gridsize > 1 and object_big
        self.pad = N // 2
        self.far_field = FarField(N)

    def forward(self, re: Tensor, im: Tensor, offsets: Tensor) -> Tensor:
        if self.use_overlap:
            re, im = reassemble_and_extract(re, im, offsets, self.pad)
        pr = self.probe[0] * self.probe_mask
        pi = self.probe[1] * self.probe_mask
        ill_re = re * pr - im * pi
        ill_im = re * pi + im * pr
        return self.far_field(ill_re, ill_im)


def poisson_nll(pred_intensity: Tensor, observed_intensity: Tensor, eps: float = 1e-8) -> Tensor:
    """Poisson negative log-likelihood per pixel, offset so a perfect fit scores 0.

    The offset (the saturated model's NLL, a function of the data only) does
    not change gradients; it makes the loss readable (≥ 0, half the Poisson
    deviance) instead of a large negative number that depends on the flux.
    """
    nll = pred_intensity - observed_intensity * torch.log(pred_intensity + eps)
    saturated = observed_intensity - torch.xlogy(observed_intensity, observed_intensity)
    return torch.mean(nll - saturated)


def amplitude_mae(pred_amplitude: Tensor, observed_amplitude: Tensor) -> Tensor:
    return torch.mean(torch.abs(pred_amplitude - observed_amplitude))

