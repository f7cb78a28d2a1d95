"""The evaluation metrics (``ptycho_export.metrics``) on cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("skimage")
from scipy import ndimage  # noqa: E402

from ptycho_export import metrics as M  # noqa: E402


def smooth_object(shape=(128, 128), seed=0, sigma=3.0) -> np.ndarray:
    """A band-limited complex object: amplitude in about [0.5, 1], phase about ±1 rad."""
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    p = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    amp = 0.75 + 0.25 * np.tanh(a / a.std())
    return amp * np.exp(1j * p / p.std())


def central_mask(shape=(128, 128), margin=16) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[margin:-margin, margin:-margin] = True
    return m


def fourier_shift(img: np.ndarray, shift) -> np.ndarray:
    return np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(img), shift))


def test_identical_images_score_perfectly():
    obj = smooth_object()
    al = M.align_to_truth(obj, obj, central_mask())
    q = M.image_quality(al)
    assert al.shift_px == (0.0, 0.0)
    assert q["amplitude_ssim"] == pytest.approx(1.0, abs=1e-9)
    assert q["phase_ssim"] == pytest.approx(1.0, abs=1e-9)
    assert q["amplitude_psnr_db"] == math.inf
    assert q["phase_psnr_db"] > 200  # the phase goes through angle(): error ~1e-16 rad, not exactly 0
    assert q["amplitude_rmse"] == 0.0 and q["phase_rmse_rad"] < 1e-12
    assert q["frc_reaches_nyquist"] and q["frc_resolution_px"] == 2.0
    assert M._psnr_db(np.abs(obj), np.abs(obj), 1.0) == math.inf


def test_a_global_phase_offset_is_removed():
    obj = smooth_object()
    al = M.align_to_truth(obj * np.exp(1.0j), obj, central_mask(), register_shift=False)
    assert al.phase_offset_rad == pytest.approx(-1.0, abs=1e-9)
    q = M.image_quality(al)
    assert q["phase_rmse_rad"] < 1e-9 and q["phase_ssim"] == pytest.approx(1.0, abs=1e-9)
    # without the removal the same pair would score badly: the metric really depends on it
    raw = M.Alignment(obj * np.exp(1.0j), obj, central_mask(), (0.0, 0.0), 0.0, M.bounding_box(central_mask()))
    assert M.image_quality(raw)["phase_rmse_rad"] == pytest.approx(1.0, abs=1e-9)


def test_a_global_amplitude_scale_is_removed_unless_asked_to_keep_it():
    """An object reconstructed 8% too bright (an assumed probe scale) scores as the truth; kept, it does not."""
    obj = smooth_object()
    al = M.align_to_truth(1.08 * obj, obj, central_mask(), register_shift=False)
    assert al.amplitude_scale == pytest.approx(1 / 1.08, rel=1e-9)
    q = M.image_quality(al)
    assert q["amplitude_rmse"] < 1e-9 and q["amplitude_ssim"] == pytest.approx(1.0, abs=1e-9)
    kept = M.align_to_truth(1.08 * obj, obj, central_mask(), register_shift=False, remove_amplitude_scale=False)
    assert kept.amplitude_scale == 1.0
    rms = np.sqrt(np.mean(np.abs(obj[central_mask()]) ** 2))
    assert M.image_quality(kept)["amplitude_rmse"] == pytest.approx(0.08 * rms, rel=1e-6)
    # the phase is untouched by the scale
    assert M.image_quality(kept)["phase_rmse_rad"] < 1e-9


@pytest.mark.parametrize("ramp", [(0.004, -0.011), (-0.2, 0.05)])
def test_a_linear_phase_ramp_is_removed_only_when_asked(ramp):
    """A probe refined with the object leaves O·exp(ik·r) undetermined: that ramp is removed on request, only."""
    obj = smooth_object()
    rows, cols = np.indices(obj.shape)
    tilted = obj * np.exp(1j * (ramp[0] * rows + ramp[1] * cols + 0.3))
    al = M.align_to_truth(tilted, obj, central_mask(), register_shift=False, remove_phase_ramp=True)
    assert al.phase_ramp_rad_per_px == pytest.approx((-ramp[0], -ramp[1]), abs=1e-6)
    assert M.image_quality(al)["phase_rmse_rad"] < 1e-6
    kept = M.align_to_truth(tilted, obj, central_mask(), register_shift=False)
    assert kept.phase_ramp_rad_per_px == (0.0, 0.0)
    assert M.image_quality(kept)["phase_rmse_rad"] > 0.1
    plain = M.align_to_truth(obj, obj, central_mask(), register_shift=False, remove_phase_ramp=True)
    assert max(abs(k) for k in plain.phase_ramp_rad_per_px) < 1e-9  # nothing to remove: nothing is


@pytest.mark.parametrize("shift", [(1.3, -0.7), (-0.45, 2.2)])
def test_a_known_subpixel_shift_is_recovered_to_a_tenth_of_a_pixel(shift):
    obj = smooth_object(seed=3)
    moved = fourier_shift(obj, shift) * np.exp(-0.6j)
    mask = central_mask()
    found = M.register(obj, moved, mask)
    assert found == pytest.approx((-shift[0], -shift[1]), abs=0.1)
    al = M.align_to_truth(moved, obj, mask)
    q = M.image_quality(al)
    unaligned = M.image_quality(M.align_to_truth(moved, obj, mask, register_shift=False))
    assert q["phase_ssim"] > 0.98 and q["amplitude_ssim"] > 0.98
    assert unaligned["phase_ssim"] < q["phase_ssim"] - 0.05  # the registration is what fixed it
    assert al.mask.sum() < mask.sum()  # pixels shifted in from outside the scanned area are not scored


def test_frc_is_one_for_identical_and_near_zero_for_independent_noise():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((128, 128)) + 1j * rng.standard_normal((128, 128))
    b = rng.standard_normal((128, 128)) + 1j * rng.standard_normal((128, 128))
    f, frc, n = M.fourier_ring_correlation(a, a)
    assert f[0] == 0 and f[-1] == pytest.approx(0.5)
    assert np.allclose(frc[1:], 1.0)
    f, frc, n = M.fourier_ring_correlation(a, b)
    big = n >= 100
    assert abs(np.mean(frc[big])) < 0.03
    assert np.max(np.abs(frc[big])) < 4 / np.sqrt(n[big].min())  # the noise floor ~1/sqrt(pixels per ring)
    assert M.frc_resolution(f, frc)["resolution_px"] > 20


def test_frc_resolution_finds_the_cutoff_of_a_low_pass_copy():
    rng = np.random.default_rng(2)
    truth = rng.standard_normal((128, 128)) + 1j * rng.standard_normal((128, 128))
    fy, fx = np.fft.fftfreq(128), np.fft.fftfreq(128)
    keep = np.hypot(fy[:, None], fx[None, :]) < 0.125  # nothing finer than 8 px survives
    noise = rng.standard_normal((128, 128)) + 1j * rng.standard_normal((128, 128))
    recon = np.fft.ifft2(np.fft.fft2(truth) * keep) + 0.05 * noise
    f, frc, _ = M.fourier_ring_correlation(truth, recon)
    res = M.frc_resolution(f, frc)
    assert not res["reaches_nyquist"]
    assert res["resolution_px"] == pytest.approx(8.0, abs=0.6)


def test_scanned_mask_uses_the_given_level_and_the_truth_extent():
    w = np.array([[0.0, 0.1, 0.5], [1.0, 2.0, 4.0]])
    inside = np.ones_like(w, bool)
    inside[1, 2] = False
    assert M.scanned_mask(w, inside, 0.2).tolist() == [[False, False, False], [True, True, False]]
    assert M.scanned_mask(w, inside, 0.2, level=1.0).tolist() == [[False, False, True], [True, True, False]]
    with pytest.raises(ValueError, match="min_weight_fraction"):
        M.scanned_mask(w, inside, 1.5)
    with pytest.raises(ValueError, match="mask is empty"):
        M.align_to_truth(w.astype(complex), w.astype(complex), np.zeros_like(w, bool))


def test_an_implausibly_large_shift_is_reported_but_not_applied():
    obj = smooth_object(seed=5)
    moved = fourier_shift(obj, (9.0, -7.0))
    al = M.align_to_truth(moved, obj, central_mask(), max_shift_px=4.0)
    assert al.found_shift_px == pytest.approx((-9.0, 7.0), abs=0.1)
    assert al.shift_px == (0.0, 0.0) and al.mask.sum() == central_mask().sum()
    assert M.align_to_truth(moved, obj, central_mask(), max_shift_px=10.0).shift_px == pytest.approx((-9, 7), abs=0.1)
