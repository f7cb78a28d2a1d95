"""The PtychoPINN networks in PyTorch.

``diffraction_to_obj``: diffraction amplitude [B, C, N, N] → complex object
patches [B, C, N, N] (a U-Net with separate amplitude and phase decoders).
``autoencoder``: the same network followed by the physics (overlap constraint,
probe, far field) so it can be trained without ground truth, against the
measured diffraction itself (Poisson likelihood).

Both share one generator and one intensity scaler, so training the
autoencoder trains ``diffraction_to_obj``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptycho_runtime.format import OUTPUT_NAMES  # noqa: F401 - one definition, re-exported

from .config import ModelConfig
from .data.simulate import intensity_scale_from_nphotons
from .physics import PhysicsForward, shifted_dft_matrices


def encoder_filters(N: int, n_filters_scale: int) -> list[int]:
    """[32, 64, 128]·s at N=64, one more (halved) stage in front per doubling of N."""
    stages = int(math.log2(N)) - 3
    return [n_filters_scale * 128 // 2 ** (stages - 1 - i) for i in range(stages)]


def decoder_filters(N: int, n_filters_scale: int) -> list[int]:
    """[64, 32]·s at N=64, [128, 64, 32]·s at 128 …: back up to N/2 resolution."""
    stages = int(math.log2(N)) - 3
    return [n_filters_scale * 32 * 2 ** (stages - 2 - j) for j in range(stages - 1)]


class Activation(nn.Module):
    """A named activation, so the choice is data (config), not code. An unknown name is an error, not identity."""

    NAMES = ("sigmoid", "swish", "silu", "softplus", "relu", "pi_tanh", "identity")

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in self.NAMES:
            raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(self.NAMES)}")
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        if self.name == "sigmoid":
            return torch.sigmoid(x)
        if self.name == "swish" or self.name == "silu":
            return F.silu(x)
        if self.name == "softplus":
            return F.softplus(x)
        if self.name == "relu":
            return F.relu(x)
        if self.name == "pi_tanh":
            return math.pi * torch.tanh(x)
        return x


class ConvPair(nn.Module):
    """Two 3×3 convolutions with ReLU: the body of every encoder and decoder stage."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))))


class Encoder(nn.Module):
    def __init__(self, c_in: int, filters: list[int]) -> None:
        super().__init__()
        chans = [c_in] + filters
        self.stages = nn.ModuleList(ConvPair(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = F.max_pool2d(stage(x), 2)
        return x


class Decoder(nn.Module):
    """Conv-up stages to N/2, then PtychoPINN's last stage.

    The last stage has a central path (all but the last 4 channels → C maps at
    N/2, activated, zero-padded by N/4 to N: the well-illuminated centre) and,
    when ``probe_big``, an outer path (the last 4 channels up-sampled to N →
    C maps, swish) that is added on, covering the probe's tails.
    """

    OUTER_CHANNELS = 4

    def __init__(self, c_in: int, filters: list[int], channels_out: int, N: int,
                 n_filters_scale: int, activation: str, outer_activation: str, probe_big: bool) -> None:
        super().__init__()
        chans = [c_in] + filters
        self.stages = nn.ModuleList(ConvPair(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True))
        last = chans[-1]
        self.split = last - self.OUTER_CHANNELS
        self.central = nn.Conv2d(self.split, channels_out, 3, padding=1)
        self.activation = Activation(activation)
        self.pad = N // 4
        self.probe_big = probe_big
        self.outer_up = ConvPair(self.OUTER_CHANNELS, 32 * n_filters_scale)
        self.outer = nn.Conv2d(32 * n_filters_scale, channels_out, 3, padding=1)
        self.outer_activation = Activation(outer_activation)

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = F.interpolate(stage(x), scale_factor=2.0, mode="nearest")
        centre = self.activation(self.central(x[:, : self.split]))
        centre = F.pad(centre, [self.pad, self.pad, self.pad, self.pad])
        if not self.probe_big:
            return centre
        outer = F.interpolate(self.outer_up(x[:, self.split :]), scale_factor=2.0, mode="nearest")
        return centre + self.outer_activation(self.outer(outer))


class Generator(nn.Module):
    """U-Net-style encoder with two decoders; returns the two real output maps."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, N, s = config.channels, config.N, config.n_filters_scale
        enc = encoder_filters(N, s)
        dec = decoder_filters(N, s)
        amp_phase = config.output_mode == "amp_phase"
        outer_act = "silu" if amp_phase else "identity"
        self.residual = config.input_backprojection and not amp_phase
        self.encoder = Encoder(3 * C if config.input_backprojection else C, enc)
        self.decoder_a = Decoder(enc[-1], dec, C, N, s, config.amp_activation if amp_phase else "identity",
                                 outer_act, config.probe_big)
        self.decoder_b = Decoder(enc[-1], dec, C, N, s, "pi_tanh" if amp_phase else "identity",
                                 outer_act, config.probe_big)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal weights, zero biases.

        PyTorch's default conv init (variance 1/(3·fan_in), random biases)
        shrinks the signal ~6× per ReLU layer: after the ~10 layers between input
        and output the biases dominate and the untrained network's output is
        the same for every diffraction pattern (std across inputs ~1e-7), a
        start from which neither supervised nor physics training escapes in a
        sensible number of epochs. He init keeps the signal's variance through
        the ReLU body; the central heads get Glorot init (Keras' default, which
        PtychoPINN uses) so sigmoid and π·tanh start in their linear range; the
        outer head (swish, unbounded) starts at zero, so the first steps do not
        fling huge values into the probe tails (that caused loss spikes of
        1e5–1e9 in the first epoch).
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        for decoder in (self.decoder_a, self.decoder_b):
            nn.init.xavier_uniform_(decoder.central.weight)  # Glorot: sigmoid/π·tanh start unsaturated
            nn.init.zeros_(decoder.outer.weight)  # the unbounded outer (probe-tail) path starts at exactly 0
            if self.residual:  # a correction to the back-projection starts at exactly 0: the model starts at O₀
                nn.init.zeros_(decoder.central.weight)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        z = self.encoder(x)
        return self.decoder_a(z), self.decoder_b(z)


class BackProjection(nn.Module):
    """The linearised object estimate of each pattern, from the probe alone: two input channels for the U-Net.

    Each measured amplitude A is given the phase of the probe's own far
    field, θ = angle(F P), propagated back and divided by the probe:
    O₀ = F⁻¹(A·e^{iθ})·P* / (|P|² + 0.01·max|P|²). For a weakly scattering
    object this is O up to the scattered wave's phase error; for strong ones
    it is still a localised, roughly right picture. Untrained, it scores
    phase SSIM 0.26 / amplitude 0.40 on the realistic held-out scan, more
    than networks trained 6 minutes without it (docs/fidelity.md), so the
    U-Net starts from a local correction task instead of having to learn a
    Fourier inversion with 3×3 convolutions. The inverse DFT is written as
    matmuls (exportable, runs on every onnxruntime provider); all buffers
    derive from the probe, so none enters a state_dict.
    """

    def __init__(self, probe: np.ndarray) -> None:
        super().__init__()
        p = np.asarray(probe).astype(np.complex128)
        N = p.shape[-1]
        theta = np.exp(1j * np.angle(np.fft.fftshift(np.fft.fft2(p))))
        gain = np.conj(p) / (np.abs(p) ** 2 + 0.01 * np.max(np.abs(p) ** 2))
        lr, li = shifted_dft_matrices(N)
        for name, value in (("theta_re", theta.real), ("theta_im", theta.imag), ("gain_re", gain.real),
                            ("gain_im", gain.imag), ("dft_re", lr), ("dft_im", li)):
            self.register_buffer(name, torch.from_numpy(np.asarray(value, np.float32)), persistent=False)
        self.N = N

    def forward(self, amplitude: Tensor) -> Tensor:
        """Normalised amplitude [B, C, N, N] → [B, 3C, N, N]: amplitude, Re O₀, Im O₀."""
        yr, yi = amplitude * self.theta_re, amplitude * self.theta_im
        lr, li = self.dft_re, self.dft_im
        # ψ = L^H Y conj(L) / N, the inverse of the unitary shifted DFT (L = fftshift folded into the DFT)
        lrt, lit = lr.transpose(0, 1), li.transpose(0, 1)
        tr = torch.matmul(lrt, yr) + torch.matmul(lit, yi)
        ti = torch.matmul(lrt, yi) - torch.matmul(lit, yr)
        pr = (torch.matmul(tr, lr) + torch.matmul(ti, li)) / self.N
        pi = (torch.matmul(ti, lr) - torch.matmul(tr, li)) / self.N
        o_re = pr * self.gain_re - pi * self.gain_im
        o_im = pr * self.gain_im + pi * self.gain_re
        return torch.cat([amplitude, o_re, o_im], dim=1)


class IntensityScaler(nn.Module):
    """log(intensity_scale) as a parameter: the network sees x / scale, outputs are × scale."""

    def __init__(self, intensity_scale: float, trainable: bool) -> None:
        super().__init__()
        if not (intensity_scale > 0 and math.isfinite(intensity_scale)):
            raise ValueError(f"intensity_scale must be a positive finite number (got {intensity_scale!r})")
        self.log_scale = nn.Parameter(torch.tensor(math.log(intensity_scale), dtype=torch.float32),
                                      requires_grad=trainable)

    def scale(self) -> Tensor:
        return torch.exp(self.log_scale)


class DiffractionToObject(nn.Module):
    """Diffraction amplitude (photon units, see docs/contract) → complex64 object patches.

    ``forward`` returns complex64 [B, C, N, N]; ``forward_parts`` returns the
    two real maps (amplitude/phase or real/imag per ``output_mode``), which is
    what exported graphs output (ONNX has no complex dtype).
    """

    __jit_ignored_attributes__ = ["model_config"]

    def __init__(self, config: ModelConfig, generator: Generator, scaler: IntensityScaler,
                 probe: Optional[np.ndarray] = None) -> None:
        super().__init__()
        self.model_config = config  # the architecture this module was built with (saved into bundles)
        self.generator = generator
        self.scaler = scaler
        self.backprojection: Optional[BackProjection] = None
        if config.input_backprojection:
            if probe is None:
                raise ValueError("input_backprojection needs the probe the model is trained with")
            self.backprojection = BackProjection(probe)
        self.N = config.N
        self.channels = config.channels
        self.amp_phase = config.output_mode == "amp_phase"

    def forward_parts(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[2] != self.N or x.shape[3] != self.N:
            raise ValueError(
                "diffraction must have shape [B, {}, {}, {}] (C = gridsize**2), got {}".format(
                    self.channels, self.N, self.N, list(x.shape)))
        x = x / self.scaler.scale()
        if self.backprojection is None:
            return self.generator(x)
        x = self.backprojection(x)
        a, b = self.generator(x)
        if self.amp_phase:
            return a, b
        C = self.channels  # real/imag output: the network learns a correction to the back-projection O₀
        return x[:, C:2 * C] + a, x[:, 2 * C:] + b

    def to_real_imag(self, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
        if self.amp_phase:
            return a * torch.cos(b), a * torch.sin(b)
        return a, b

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.forward_parts(x)
        re, im = self.to_real_imag(a, b)
        return torch.complex(re, im)


class Autoencoder(nn.Module):
    """PtychoPINN's trainable model: object patches pushed through the physics.

    ``forward(x, offsets)`` → (object patches complex64, predicted amplitude,
    predicted intensity), the predictions in the same photon units as ``x``.
    """

    def __init__(self, d2o: DiffractionToObject, physics: PhysicsForward) -> None:
        super().__init__()
        self.diffraction_to_obj = d2o
        self.physics = physics

    def forward_parts(self, x: Tensor, offsets: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        a, b = self.diffraction_to_obj.forward_parts(x)
        re, im = self.diffraction_to_obj.to_real_imag(a, b)
        intensity = self.physics(re, im, offsets)
        s = self.diffraction_to_obj.scaler.scale()
        pred_intensity = intensity * (s * s)
        pred_amplitude = torch.sqrt(intensity.clamp_min(1e-20)) * s
        return a, b, pred_amplitude, pred_intensity

    def forward(self, x: Tensor, offsets: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        a, b, pred_amplitude, pred_intensity = self.forward_parts(x, offsets)
        re, im = self.diffraction_to_obj.to_real_imag(a, b)
        return torch.complex(re, im), pred_amplitude, pred_intensity


default_intensity_scale = intensity_scale_from_nphotons  # PtychoPINN's name for sqrt(nphotons) / (N/2)


def build_models(config: ModelConfig, probe: Optional[np.ndarray] = None,
                 intensity_scale: Optional[float] = None, nphotons: float = 1e9) -> Dict[str, nn.Module]:
    """Build ``{"autoencoder", "diffraction_to_obj"}`` sharing one generator, from an explicit config.

    No global state is read: the architecture is ``config``; the intensity
    scale is ``intensity_scale``, else ``config.intensity_scale``, else the
    one ``nphotons`` implies; a missing probe is the default simulated probe.
    """
    N = config.N
    scale = intensity_scale or config.intensity_scale or default_intensity_scale(float(nphotons), N)
    if probe is None:
        from .data.simulate import default_probe

        probe = default_probe(N)
    probe = np.asarray(probe)
    generator = Generator(config)
    scaler = IntensityScaler(float(scale), config.intensity_scale_trainable)
    d2o = DiffractionToObject(config, generator, scaler, probe)
    physics = PhysicsForward(N, config.gridsize, probe, config.object_big, config.probe_mask, config.probe_trainable)
    return {"autoencoder": Autoencoder(d2o, physics), "diffraction_to_obj": d2o}


def create_torch_model_with_gridsize(gridsize: int, N: int, params: Optional[Dict[str, Any]] = None
                                     ) -> Dict[str, nn.Module]:
    """PtychoPINN's entry point: ``build_models`` with the config read from a legacy params dict.

    ``params`` defaults to the live ``params.cfg`` (read, never written: call
    ``load_torch_bundle`` first to restore a bundle's params, CONFIG-001).
    ``gridsize`` and ``N`` arguments win over the dict.
    """
    from . import params as params_module

    p = dict(params_module.cfg if params is None else params)
    p["gridsize"], p["N"] = gridsize, N
    return build_models(params_module.model_config_from_params(p), p.get("probe"), p.get("intensity_scale"),
                        float(p.get("nphotons", 1e9)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
