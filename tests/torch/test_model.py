"""Tests for the PtychoPINN networks: shapes, dtypes, sharing, sizes, activations, scaler."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402

from ptycho_export import params  # noqa: E402
from ptycho_export.config import AMP_ACTIVATIONS  # noqa: E402
from ptycho_export.model import (  # noqa: E402
    Activation,
    Autoencoder,
    DiffractionToObject,
    count_parameters,
    create_torch_model_with_gridsize,
    decoder_filters,
    default_intensity_scale,
    encoder_filters,
)


def _params(**overrides):
    p = dict(params.cfg)
    p.update({"n_filters_scale": 1})
    p.update(overrides)
    return p


def _input(B, C, N, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, N, N, generator=g) * scale


@pytest.mark.parametrize("N, gridsize", [(64, 1), (64, 2), (128, 1)])
def test_output_shapes_and_dtypes(N, gridsize):
    torch.manual_seed(0)
    models = create_torch_model_with_gridsize(gridsize, N, _params())
    assert set(models) == {"autoencoder", "diffraction_to_obj"}
    d2o, ae = models["diffraction_to_obj"], models["autoencoder"]
    assert isinstance(d2o, DiffractionToObject) and isinstance(ae, Autoencoder)
    C, B = gridsize**2, 2
    x = _input(B, C, N, scale=10.0)
    with torch.no_grad():
        obj = d2o(x)
        a, b = d2o.forward_parts(x)
        out = ae(x, torch.zeros(B, C, 1, 2))
    assert obj.shape == (B, C, N, N) and obj.dtype == torch.complex64
    assert a.shape == b.shape == (B, C, N, N) and a.dtype == b.dtype == torch.float32
    assert isinstance(out, tuple) and len(out) == 3
    ae_obj, pred_amp, pred_int = out
    assert ae_obj.shape == (B, C, N, N) and ae_obj.dtype == torch.complex64
    assert pred_amp.shape == (B, C, N, N) and pred_amp.dtype == torch.float32
    assert pred_int.shape == (B, C, N, N) and pred_int.dtype == torch.float32
    assert torch.all(torch.isfinite(pred_int)) and torch.all(pred_int >= 0)
    # amplitude and intensity are consistent, and the autoencoder's object is d2o's object
    torch.testing.assert_close(pred_amp**2, pred_int, rtol=1e-4, atol=1e-6 * float(pred_int.max()))
    torch.testing.assert_close(ae_obj, obj)


def test_generator_and_scaler_shared_between_models():
    models = create_torch_model_with_gridsize(1, 64, _params())
    d2o, ae = models["diffraction_to_obj"], models["autoencoder"]
    assert ae.diffraction_to_obj is d2o
    ae_params = {id(p) for p in ae.parameters()}
    d2o_params = list(d2o.parameters())
    assert d2o_params and all(id(p) in ae_params for p in d2o_params)
    # same Parameter objects under the same names
    ae_named = dict(ae.named_parameters())
    for name, p in d2o.named_parameters():
        assert ae_named["diffraction_to_obj." + name] is p
    # training one trains the other
    with torch.no_grad():
        ae.diffraction_to_obj.generator.encoder.stages[0].conv1.bias.add_(1.0)
    assert torch.equal(d2o.generator.encoder.stages[0].conv1.bias,
                       ae.diffraction_to_obj.generator.encoder.stages[0].conv1.bias)


def test_parameter_count_matches_ptychopinn():
    models = create_torch_model_with_gridsize(1, 64, _params(n_filters_scale=2))
    n = count_parameters(models["diffraction_to_obj"])
    assert 2.25e6 < n < 2.42e6, n  # PtychoPINN reports ~2.3 M at N=64, n_filters_scale=2
    # the autoencoder adds no trainable weights (probe is a fixed buffer by default)
    assert count_parameters(models["autoencoder"]) == n
    # scaling filters by 1/2 gives roughly a quarter of the weights
    n1 = count_parameters(create_torch_model_with_gridsize(1, 64, _params(n_filters_scale=1))["diffraction_to_obj"])
    assert 0.2 < n1 / n < 0.3


@pytest.mark.parametrize(
    "N, expected",
    [(64, [32, 64, 128]), (128, [16, 32, 64, 128]), (256, [8, 16, 32, 64, 128])],
)
@pytest.mark.parametrize("s", [1, 2, 3])
def test_encoder_filters(N, expected, s):
    assert encoder_filters(N, s) == [f * s for f in expected]


@pytest.mark.parametrize("N, expected", [(64, [64, 32]), (128, [128, 64, 32]), (256, [256, 128, 64, 32])])
def test_decoder_filters(N, expected):
    assert decoder_filters(N, 2) == [f * 2 for f in expected]


@pytest.mark.parametrize("N", [64, 128])
def test_built_encoder_uses_those_filters(N):
    d2o = create_torch_model_with_gridsize(2, N, _params())["diffraction_to_obj"]
    stages = d2o.generator.encoder.stages
    assert [st.conv2.out_channels for st in stages] == encoder_filters(N, 1)
    assert stages[0].conv1.in_channels == 4  # C = gridsize**2


@pytest.mark.parametrize("activation", AMP_ACTIVATIONS)
def test_each_amp_activation(activation):
    torch.manual_seed(0)
    d2o = create_torch_model_with_gridsize(1, 64, _params(amp_activation=activation))["diffraction_to_obj"]
    assert d2o.generator.decoder_a.activation.name == activation
    assert d2o.generator.decoder_b.activation.name == "pi_tanh"
    with torch.no_grad():
        amp, phase = d2o.forward_parts(_input(2, 1, 64, scale=50.0))
    assert torch.all(torch.isfinite(amp)) and torch.all(torch.isfinite(phase))
    # the phase head is pi*tanh (+ the bounded outer swish path)
    assert float(phase.abs().max()) < 2 * math.pi


@pytest.mark.parametrize(
    "name, ref",
    [
        ("sigmoid", torch.sigmoid),
        ("swish", torch.nn.functional.silu),
        ("silu", torch.nn.functional.silu),
        ("softplus", torch.nn.functional.softplus),
        ("relu", torch.relu),
        ("pi_tanh", lambda x: math.pi * torch.tanh(x)),
        ("identity", lambda x: x),
    ],
)
def test_activation_numerics(name, ref):
    x = torch.linspace(-5, 5, 101)
    torch.testing.assert_close(Activation(name)(x), ref(x))


@pytest.mark.parametrize("activation, lo, hi", [("sigmoid", 0.0, 1.0), ("relu", 0.0, math.inf),
                                                ("softplus", 0.0, math.inf)])
def test_amplitude_range_without_outer_path(activation, lo, hi):
    """probe_big=False: amplitude = activated centre zero-padded by N/4 (PtychoPINN's last stage)."""
    torch.manual_seed(0)
    N = 64
    d2o = create_torch_model_with_gridsize(1, N, _params(amp_activation=activation, **{"probe.big": False})
                                           )["diffraction_to_obj"]
    with torch.no_grad():
        amp, _ = d2o.forward_parts(_input(2, 1, N, scale=50.0))
    assert float(amp.min()) >= lo and float(amp.max()) <= hi
    q = N // 4
    border = torch.ones(N, N, dtype=torch.bool)
    border[q:N - q, q:N - q] = False
    assert torch.all(amp[..., border] == 0)
    if activation == "sigmoid":
        assert torch.all(amp[..., q:N - q, q:N - q] > 0)


def test_amp_phase_output_is_polar():
    torch.manual_seed(0)
    d2o = create_torch_model_with_gridsize(1, 64, _params())["diffraction_to_obj"]
    x = _input(2, 1, 64, scale=20.0)
    with torch.no_grad():
        amp, phase = d2o.forward_parts(x)
        obj = d2o(x)
    torch.testing.assert_close(obj, torch.polar(amp, phase) if bool(torch.all(amp >= 0)) else
                               torch.complex(amp * torch.cos(phase), amp * torch.sin(phase)))


def test_output_mode_real_imag():
    torch.manual_seed(0)
    d2o = create_torch_model_with_gridsize(1, 64, _params(output_mode="real_imag"))["diffraction_to_obj"]
    assert d2o.generator.decoder_a.activation.name == "identity"
    assert d2o.generator.decoder_b.activation.name == "identity"
    x = _input(2, 1, 64, scale=20.0)
    with torch.no_grad():
        re, im = d2o.forward_parts(x)
        obj = d2o(x)
    assert obj.dtype == torch.complex64
    assert torch.equal(obj.real, re) and torch.equal(obj.imag, im)
    assert float(re.min()) < 0 or float(im.min()) < 0  # not squashed into an amplitude range


@pytest.mark.parametrize(
    "gridsize, N, bad_shape",
    [(1, 64, (2, 1, 32, 32)), (1, 64, (2, 4, 64, 64)), (2, 64, (2, 1, 64, 64)), (1, 64, (1, 64, 64)),
     (1, 128, (1, 1, 64, 64))],
)
def test_wrong_input_shape_raises(gridsize, N, bad_shape):
    models = create_torch_model_with_gridsize(gridsize, N, _params())
    C = gridsize**2
    expected = rf"\[B, {C}, {N}, {N}\]"
    x = torch.zeros(bad_shape)
    with pytest.raises(ValueError, match=expected) as info:
        models["diffraction_to_obj"](x)
    assert str(list(bad_shape)) in str(info.value)
    with pytest.raises(ValueError, match=expected):
        models["autoencoder"](x, torch.zeros(bad_shape[0], C, 1, 2))


def test_intensity_scaler_network_sees_x_over_scale():
    torch.manual_seed(0)
    d2o = create_torch_model_with_gridsize(1, 64, _params(intensity_scale=10.0))["diffraction_to_obj"]
    d2o.eval()
    assert float(d2o.scaler.scale().detach()) == pytest.approx(10.0, rel=1e-6)
    x = _input(2, 1, 64, scale=30.0)
    with torch.no_grad():
        ref = d2o(x)
        # the generator is fed exactly x / scale
        a, b = d2o.forward_parts(x)
        ga, gb = d2o.generator(x / 10.0)
        d2o.scaler.log_scale.add_(math.log(4.0))  # scale 40
        scaled = d2o(x * 4.0)
        unscaled = d2o(x)
    torch.testing.assert_close(a, ga, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, gb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled, ref, rtol=1e-5, atol=1e-6)
    # the scale really enters the network: same x, different scale → different object
    assert float((unscaled - ref).abs().max()) > 1e-5


def test_intensity_scale_default_from_nphotons():
    p = _params(nphotons=1e6, intensity_scale=None)
    d2o = create_torch_model_with_gridsize(1, 64, p)["diffraction_to_obj"]
    assert default_intensity_scale(1e6, 64) == pytest.approx(1000 / 32)
    assert float(d2o.scaler.scale().detach()) == pytest.approx(1000 / 32, rel=1e-6)


@pytest.mark.parametrize("trainable", [True, False])
def test_intensity_scale_trainable_flag(trainable):
    models = create_torch_model_with_gridsize(1, 64, _params(**{"intensity_scale.trainable": trainable}))
    log_scale = models["diffraction_to_obj"].scaler.log_scale
    assert log_scale.requires_grad is trainable
    in_trainable = any(p is log_scale for p in models["autoencoder"].parameters() if p.requires_grad)
    assert in_trainable is trainable


def test_fixed_scale_gets_no_gradient_and_trainable_does():
    for trainable in (False, True):
        torch.manual_seed(0)
        ae = create_torch_model_with_gridsize(1, 64, _params(**{"intensity_scale.trainable": trainable}))[
            "autoencoder"]
        x = _input(2, 1, 64, scale=100.0)
        _, amp, _ = ae(x, torch.zeros(2, 1, 1, 2))
        amp.sum().backward()
        grad = ae.diffraction_to_obj.scaler.log_scale.grad
        if trainable:
            assert grad is not None and torch.isfinite(grad) and float(grad) != 0.0
        else:
            assert grad is None


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_intensity_scale_rejected(bad):
    from ptycho_export.model import IntensityScaler

    with pytest.raises(ValueError, match="intensity_scale must be a positive finite number"):
        IntensityScaler(bad, True)


def test_probe_trainable_and_default_probe():
    from ptycho_export.data import default_probe

    models = create_torch_model_with_gridsize(1, 64, _params(**{"probe.trainable": True}))
    physics = models["autoencoder"].physics
    assert isinstance(physics.probe, torch.nn.Parameter) and physics.probe.requires_grad
    pr = default_probe(64)
    np.testing.assert_allclose(physics.probe[0].detach().numpy(), pr.real, atol=1e-6)
    np.testing.assert_allclose(physics.probe[1].detach().numpy(), pr.imag, atol=1e-6)
    fixed = create_torch_model_with_gridsize(1, 64, _params())["autoencoder"].physics
    assert not isinstance(fixed.probe, torch.nn.Parameter)
    assert "probe" in dict(fixed.named_buffers())


def test_explicit_gridsize_and_N_win_over_params():
    models = create_torch_model_with_gridsize(2, 128, _params(N=64, gridsize=1))
    d2o = models["diffraction_to_obj"]
    assert (d2o.N, d2o.channels) == (128, 4)
    assert models["autoencoder"].physics.use_overlap is True


def test_reads_live_params_cfg_by_default():
    params.cfg["n_filters_scale"] = 1
    params.cfg["amp_activation"] = "relu"
    d2o = create_torch_model_with_gridsize(1, 64)["diffraction_to_obj"]
    assert d2o.generator.decoder_a.activation.name == "relu"
    assert d2o.generator.encoder.stages[0].conv2.out_channels == 32


def test_build_models_reads_no_global_state():
    """The explicit-config builder under create_torch_model_with_gridsize: params.cfg plays no part."""
    from ptycho_export.config import ModelConfig
    from ptycho_export.model import build_models

    before = dict(params.cfg)
    params.cfg.update({"n_filters_scale": 4, "amp_activation": "relu", "gridsize": 3, "intensity_scale": 99.0})
    models = build_models(ModelConfig(N=64, gridsize=2, n_filters_scale=1), intensity_scale=2.0)
    d2o = models["diffraction_to_obj"]
    assert d2o.channels == 4 and d2o.generator.decoder_a.activation.name == "sigmoid"
    assert float(d2o.scaler.scale().detach()) == pytest.approx(2.0)
    assert d2o.generator.encoder.stages[0].conv2.out_channels == 32  # n_filters_scale 1, not 4
    same = create_torch_model_with_gridsize(2, 64, dict(before, n_filters_scale=1, intensity_scale=2.0))
    assert count_parameters(same["autoencoder"]) == count_parameters(models["autoencoder"])
    assert params.cfg["n_filters_scale"] == 4  # read by nobody, changed by nobody


def test_unknown_activation_name_is_an_error_not_identity():
    with pytest.raises(ValueError, match=r"unknown activation 'tanhh'; choose one of sigmoid, .*identity"):
        Activation("tanhh")
    x = torch.linspace(-2, 2, 5)
    assert torch.equal(Activation("identity")(x), x)
