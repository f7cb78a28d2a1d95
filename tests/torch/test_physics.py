"""The torch physics against independent numpy computations (data.far_field_amplitude, np.roll, means)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402

from ptycho_export import params  # noqa: E402
from ptycho_export.data import default_probe, extract_patches, far_field_amplitude, make_object  # noqa: E402
from ptycho_export.model import create_torch_model_with_gridsize  # noqa: E402
from ptycho_export.physics import (  # noqa: E402
    FarField,
    PhysicsForward,
    amplitude_mae,
    disk_mask,
    poisson_nll,
    reassemble_and_extract,
    shifted_dft_matrices,
    translate,
)


def _rel_max_err(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _pair(z):
    """complex numpy [..] → (re, im) float32 torch tensors."""
    z = np.asarray(z)
    return (torch.from_numpy(np.ascontiguousarray(z.real, np.float32)),
            torch.from_numpy(np.ascontiguousarray(z.imag, np.float32)))


@pytest.fixture(scope="module")
def obj():
    return make_object("grf", 256, seed=3)


# --------------------------------------------------------------------------- far field


@pytest.mark.parametrize("N", [64, 128])
def test_physics_forward_gridsize1_matches_numpy(N):
    probe = default_probe(N)
    lines = make_object("lines", 3 * N, seed=1)
    xs = np.array([N * 0.75 + 3, N * 1.5, N * 2.1 + 0.25])
    ys = np.array([N * 1.5, N * 0.9 + 0.5, N * 2.2])
    patches = extract_patches(lines, xs, ys, N)  # [3, N, N]
    physics = PhysicsForward(N, 1, probe)
    re, im = _pair(patches[:, None])
    with torch.no_grad():
        intensity = physics(re, im, torch.zeros(3, 1, 1, 2)).numpy()
    expected = far_field_amplitude(patches, probe)[:, None] ** 2
    assert intensity.shape == expected.shape == (3, 1, N, N)
    assert _rel_max_err(intensity, expected) < 1e-4
    # Parseval: the far field preserves the exit wave's energy (unitary 1/N normalisation)
    energy = np.sum(np.abs(patches * probe) ** 2, axis=(-2, -1))
    np.testing.assert_allclose(intensity.sum(axis=(-2, -1))[:, 0], energy, rtol=1e-4)


def test_autoencoder_physics_module_matches_numpy():
    N = 64
    probe = default_probe(N, defocus=2.0)
    models = create_torch_model_with_gridsize(1, N, dict(params.cfg, n_filters_scale=1, probe=probe))
    physics = models["autoencoder"].physics
    patches = extract_patches(make_object("grf", 160, seed=5), [50.0, 90.5], [70.0, 80.25], N)
    re, im = _pair(patches[:, None])
    with torch.no_grad():
        intensity = physics(re, im, torch.zeros(2, 1, 1, 2)).numpy()
    assert _rel_max_err(intensity, far_field_amplitude(patches, probe)[:, None] ** 2) < 1e-4


def test_dc_term_at_centre():
    N = 64
    physics = PhysicsForward(N, 1, np.ones((N, N), np.complex64))
    re, im = torch.ones(1, 1, N, N), torch.zeros(1, 1, N, N)
    with torch.no_grad():
        intensity = physics(re, im, torch.zeros(1, 1, 1, 2))[0, 0]
    assert float(intensity[N // 2, N // 2]) == pytest.approx(N * N, rel=1e-5)
    intensity[N // 2, N // 2] = 0
    assert float(intensity.abs().max()) < 1e-3


@pytest.mark.parametrize("N", [64, 128])
def test_matmul_dft_equals_fft(N):
    ff = FarField(N)
    g = torch.Generator().manual_seed(N)
    re = torch.randn(3, 2, N, N, generator=g)
    im = torch.randn(3, 2, N, N, generator=g)
    with torch.no_grad():
        via_fft = ff(re, im)
        ff.use_matmul = True
        via_matmul = ff(re, im)
    assert _rel_max_err(via_matmul.numpy(), via_fft.numpy()) < 1e-5
    # and both agree with numpy in float64
    expected = np.abs(np.fft.fftshift(np.fft.fft2(re.double().numpy() + 1j * im.double().numpy()),
                                      axes=(-2, -1))) ** 2 / (N * N)
    assert _rel_max_err(via_fft.numpy(), expected) < 1e-5
    assert _rel_max_err(via_matmul.numpy(), expected) < 1e-5


def test_dft_matrices_are_not_in_state_dict():
    ff = FarField(64)
    assert "dft_re" not in ff.state_dict() and "dft_im" not in ff.state_dict()
    lr, li = shifted_dft_matrices(8)
    L = lr.astype(np.float64) + 1j * li
    X = np.random.default_rng(0).standard_normal((8, 8))
    np.testing.assert_allclose(L @ X @ L.T, np.fft.fftshift(np.fft.fft2(X)), atol=1e-5)


# --------------------------------------------------------------------------- translate


def _roll_zero_fill(img, dx, dy):
    """out[y, x] = img[y - dy, x - dx], 0 outside (integers)."""
    out = np.zeros_like(img)
    H, W = img.shape[-2:]
    ys_dst = slice(max(dy, 0), H + min(dy, 0))
    xs_dst = slice(max(dx, 0), W + min(dx, 0))
    ys_src = slice(max(-dy, 0), H + min(-dy, 0))
    xs_src = slice(max(-dx, 0), W + min(-dx, 0))
    out[..., ys_dst, xs_dst] = img[..., ys_src, xs_src]
    return out


@pytest.mark.parametrize("dx, dy", [(0, 0), (3, 0), (0, -5), (7, 2), (-4, -9), (-1, 6)])
def test_translate_integer_shift_is_roll_with_zero_fill(dx, dy):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((2, 3, 24, 32)).astype(np.float32)
    shifts = torch.tensor([[dx, dy], [dx, dy]], dtype=torch.float32)
    out = translate(torch.from_numpy(img), shifts).numpy()
    expected = _roll_zero_fill(img, dx, dy)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # and it is *not* a circular roll when content would wrap
    if dx or dy:
        wrapped = np.roll(img, (dy, dx), axis=(-2, -1))
        assert not np.allclose(out, wrapped, atol=1e-3)


def test_translate_shifts_each_image_by_its_own_amount():
    rng = np.random.default_rng(1)
    img = rng.standard_normal((3, 1, 16, 16)).astype(np.float32)
    sh = [(1, 0), (0, 2), (-3, -1)]
    out = translate(torch.from_numpy(img), torch.tensor(sh, dtype=torch.float32)).numpy()
    for k, (dx, dy) in enumerate(sh):
        np.testing.assert_allclose(out[k], _roll_zero_fill(img[k], dx, dy), atol=1e-5)


def test_translate_half_pixel_is_average_of_neighbours():
    rng = np.random.default_rng(2)
    img = rng.standard_normal((1, 1, 20, 20)).astype(np.float32)
    t = torch.from_numpy(img)
    out_x = translate(t, torch.tensor([[0.5, 0.0]])).numpy()[0, 0]
    # out[y, x] = img[y, x - 0.5] = (img[y, x-1] + img[y, x]) / 2
    np.testing.assert_allclose(out_x[:, 1:], 0.5 * (img[0, 0, :, :-1] + img[0, 0, :, 1:]), atol=1e-5)
    out_y = translate(t, torch.tensor([[0.0, -0.5]])).numpy()[0, 0]
    # out[y, x] = img[y + 0.5, x] = (img[y, x] + img[y+1, x]) / 2
    np.testing.assert_allclose(out_y[:-1], 0.5 * (img[0, 0, :-1] + img[0, 0, 1:]), atol=1e-5)
    # the edge reads half a pixel of zeros
    np.testing.assert_allclose(out_x[:, 0], 0.5 * img[0, 0, :, 0], atol=1e-5)


def test_translate_is_differentiable_in_the_shift():
    img = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 1, 16, 16)).astype(np.float32))
    shifts = torch.tensor([[0.3, -0.2]], requires_grad=True)
    translate(img, shifts).sum().backward()
    assert shifts.grad is not None and torch.all(torch.isfinite(shifts.grad))


# --------------------------------------------------------------------------- overlap constraint


INTEGER_OFFSETS = [(-6.0, -5.0), (7.0, -4.0), (-5.0, 6.0), (4.0, 3.0)]


def _group_patches(obj, offsets, N=64, cx=128.0, cy=128.0, sign=1.0):
    xs = np.array([cx + sign * ox for ox, _ in offsets])
    ys = np.array([cy + sign * oy for _, oy in offsets])
    patches = extract_patches(obj, xs, ys, N)  # [C, N, N]
    off = torch.tensor(offsets, dtype=torch.float32).reshape(1, len(offsets), 1, 2)
    return patches[None], off


def test_reassemble_consistent_patches_unchanged(obj):
    patches, off = _group_patches(obj, INTEGER_OFFSETS)
    re, im = _pair(patches)
    out_re, out_im = reassemble_and_extract(re, im, off, pad=32)
    assert out_re.shape == re.shape == (1, 4, 64, 64)
    out = out_re.numpy() + 1j * out_im.numpy()
    interior = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(out[interior], patches[interior], atol=1e-4)
    assert np.max(np.abs(out - patches)) < 1e-4  # integer offsets: the whole patch is exact


def test_reassemble_opposite_sign_convention_is_not_consistent(obj):
    """Pins the convention: offsets are member position minus group centre (+x right, +y down)."""
    patches, off = _group_patches(obj, INTEGER_OFFSETS, sign=-1.0)
    re, im = _pair(patches)
    out_re, out_im = reassemble_and_extract(re, im, off, pad=32)
    out = out_re.numpy() + 1j * out_im.numpy()
    assert np.max(np.abs(out - patches)[..., 8:-8, 8:-8]) > 0.05


def test_reassemble_subpixel_offsets_interior_close():
    """A slowly varying object (bilinear interpolation is then near exact): sub-pixel placement is right."""
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float64)
    smooth = ((0.8 + 0.1 * np.sin(0.07 * xx + 0.05 * yy)) * np.exp(1j * (0.05 * xx - 0.03 * yy))).astype(
        np.complex64)
    offsets = [(-5.5, -4.25), (6.5, -3.5), (-4.75, 5.5), (3.5, 2.5)]
    patches, off = _group_patches(smooth, offsets)
    re, im = _pair(patches)
    out_re, out_im = reassemble_and_extract(re, im, off, pad=32)
    out = out_re.numpy() + 1j * out_im.numpy()
    err = np.abs(out - patches)[..., 2:-2, 2:-2]
    # (the largest errors sit on the other patches' edges, where bilinear weights are fractional)
    assert err.max() < 1e-2
    assert err.mean() < 1.5e-3
    # a half-pixel error in placement would show up at the object's gradient (~0.05 per pixel)
    shifted, _ = _group_patches(smooth, [(ox + 0.5, oy) for ox, oy in offsets])
    assert np.abs(out - shifted)[..., 2:-2, 2:-2].mean() > 1e-2


def test_reassemble_zero_offsets_gives_mean_of_patches():
    rng = np.random.default_rng(4)
    B, C, N = 2, 4, 32
    re = torch.from_numpy(rng.standard_normal((B, C, N, N)).astype(np.float32))
    im = torch.from_numpy(rng.standard_normal((B, C, N, N)).astype(np.float32))
    out_re, out_im = reassemble_and_extract(re, im, torch.zeros(B, C, 1, 2), pad=16)
    for k in range(C):
        np.testing.assert_allclose(out_re[:, k].numpy(), re.mean(dim=1).numpy(), atol=1e-5)
        np.testing.assert_allclose(out_im[:, k].numpy(), im.mean(dim=1).numpy(), atol=1e-5)


def test_physics_gridsize2_consistent_patches_match_numpy(obj):
    N = 64
    probe = default_probe(N)
    patches, off = _group_patches(obj, INTEGER_OFFSETS)
    re, im = _pair(patches)
    physics = PhysicsForward(N, 2, probe, object_big=True)
    assert physics.use_overlap
    with torch.no_grad():
        intensity = physics(re, im, off).numpy()
    assert _rel_max_err(intensity, far_field_amplitude(patches, probe) ** 2) < 1e-4


def test_physics_gridsize2_without_object_big_skips_overlap():
    N = 64
    probe = default_probe(N)
    rng = np.random.default_rng(5)
    patches = (rng.standard_normal((1, 4, N, N)) + 1j * rng.standard_normal((1, 4, N, N))).astype(np.complex64)
    re, im = _pair(patches)
    off = torch.tensor(INTEGER_OFFSETS, dtype=torch.float32).reshape(1, 4, 1, 2)
    physics = PhysicsForward(N, 2, probe, object_big=False)
    assert not physics.use_overlap
    with torch.no_grad():
        intensity = physics(re, im, off).numpy()
    assert _rel_max_err(intensity, far_field_amplitude(patches, probe) ** 2) < 1e-4


# --------------------------------------------------------------------------- probe


def test_disk_mask():
    m = disk_mask(64)
    assert m.shape == (64, 64) and m.dtype == np.float32
    assert m[0, 0] == 0 and m[0, 63] == 0 and m[63, 0] == 0 and m[63, 63] == 0
    assert m[32, 32] == 1 and m[31, 0] == 1 and m[0, 31] == 1
    assert set(np.unique(m)) == {0.0, 1.0}
    np.testing.assert_array_equal(m, m.T)
    assert abs(m.sum() - math.pi * 32**2) / (math.pi * 32**2) < 0.02


def test_probe_mask_zeroes_probe_outside_disk():
    N = 64
    ones_probe = np.ones((N, N), np.complex64)
    masked = PhysicsForward(N, 1, ones_probe, probe_mask=True)
    unmasked = PhysicsForward(N, 1, ones_probe, probe_mask=False)
    np.testing.assert_array_equal(masked.probe_mask.numpy(), disk_mask(N))
    assert torch.all(unmasked.probe_mask == 1)
    re, im = torch.ones(1, 1, N, N), torch.zeros(1, 1, N, N)
    with torch.no_grad():
        i_masked = masked(re, im, torch.zeros(1, 1, 1, 2)).numpy()[0, 0]
        i_unmasked = unmasked(re, im, torch.zeros(1, 1, 1, 2)).numpy()[0, 0]
    expected = far_field_amplitude(disk_mask(N).astype(np.complex64), ones_probe) ** 2
    assert _rel_max_err(i_masked, expected) < 1e-4
    assert i_masked.sum() == pytest.approx(disk_mask(N).sum(), rel=1e-4)  # energy only inside the disk
    assert i_unmasked.sum() == pytest.approx(N * N, rel=1e-4)


@pytest.mark.parametrize("bad_probe, match", [(np.ones((32, 32)), r"probe must have shape \(64, 64\)"),
                                              (np.full((64, 64), np.nan), "NaN or inf")])
def test_bad_probe_rejected(bad_probe, match):
    with pytest.raises(ValueError, match=match):
        PhysicsForward(64, 1, bad_probe)


# --------------------------------------------------------------------------- losses


def test_poisson_nll_zero_for_perfect_prediction():
    rng = np.random.default_rng(6)
    obs = torch.from_numpy(rng.poisson(50.0, size=(2, 1, 16, 16)).astype(np.float32))
    obs[0, 0, :4] = 0.0  # zero counts included
    assert abs(float(poisson_nll(obs, obs))) < 1e-5
    assert float(poisson_nll(obs * 1.2, obs)) > 1e-2
    assert float(poisson_nll(obs * 0.8, obs)) > 1e-2
    assert float(poisson_nll(obs + 1.0, obs)) > 0


def test_poisson_nll_matches_numpy_deviance():
    rng = np.random.default_rng(7)
    obs = rng.poisson(20.0, size=(3, 4, 8, 8)).astype(np.float64)
    pred = rng.uniform(5.0, 40.0, size=obs.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        xlogx = np.where(obs > 0, obs * np.log(obs), 0.0)
    expected = np.mean(pred - obs * np.log(pred) - obs + xlogx)
    got = float(poisson_nll(torch.from_numpy(pred.astype(np.float32)), torch.from_numpy(obs.astype(np.float32))))
    assert got == pytest.approx(expected, rel=1e-4)
    assert got > 0


def test_poisson_nll_minimised_at_observation():
    obs = torch.full((1, 1, 4, 4), 10.0)
    values = {k: float(poisson_nll(torch.full_like(obs, k), obs)) for k in (5.0, 9.0, 10.0, 11.0, 20.0)}
    assert min(values, key=values.get) == 10.0


def test_amplitude_mae():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert float(amplitude_mae(a, a)) == 0.0
    assert float(amplitude_mae(a, torch.tensor([2.0, 2.0, 1.0]))) == pytest.approx(1.0)


# --------------------------------------------------------------------------- autoencoder with a controlled network


@pytest.mark.parametrize("gridsize", [1, 2])
def test_autoencoder_prediction_equals_numpy_far_field_times_scale(monkeypatch, obj, gridsize):
    N, scale = 64, 37.5
    probe = default_probe(N)
    models = create_torch_model_with_gridsize(gridsize, N, dict(params.cfg, n_filters_scale=1, probe=probe,
                                                                intensity_scale=scale))
    ae, d2o = models["autoencoder"], models["diffraction_to_obj"]
    assert float(d2o.scaler.scale().detach()) == pytest.approx(scale, rel=1e-6)
    if gridsize == 1:
        patches = extract_patches(obj, [100.0, 140.5], [120.0, 90.0], N)[:, None]
        off = torch.zeros(2, 1, 1, 2)
    else:
        patches, off = _group_patches(obj, INTEGER_OFFSETS)
    amp = torch.from_numpy(np.abs(patches).astype(np.float32))
    phase = torch.from_numpy(np.angle(patches).astype(np.float32))
    monkeypatch.setattr(d2o, "forward_parts", lambda x: (amp, phase))
    x = torch.zeros(patches.shape[0], gridsize**2, N, N)
    with torch.no_grad():
        obj_out, pred_amp, pred_int = ae(x, off)
    np.testing.assert_allclose(obj_out.numpy(), patches, atol=1e-5)
    expected_amp = far_field_amplitude(patches, probe) * scale
    assert _rel_max_err(pred_amp.numpy(), expected_amp) < 1e-4
    assert _rel_max_err(pred_int.numpy(), expected_amp**2) < 1e-4
