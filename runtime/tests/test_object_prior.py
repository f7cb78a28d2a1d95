"""The amplitude prior after refinement (refinement.object_prior): its solver, noise estimate and rule."""

from __future__ import annotations

import numpy as np
import pytest

from ptycho_runtime.refinement.object_prior import (
    MIN_PIXELS,
    apply_amplitude_prior,
    noise_sigma,
    tv_denoise,
    well_lit,
)


def _blocks(size: int = 160, block: int = 16, seed: int = 0) -> np.ndarray:
    """A piecewise-constant amplitude in [0.5, 1]: what TV is for, with sharp edges it must keep."""
    rng = np.random.default_rng(seed)
    return np.kron(0.5 + 0.5 * rng.random((size // block, size // block)), np.ones((block, block)))


def _noisy_object(sigma: float = 0.03, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    truth_amp = _blocks()
    y, x = np.mgrid[:truth_amp.shape[0], :truth_amp.shape[1]]
    phase = 0.8 * np.sin(x / 17.0) * np.cos(y / 23.0)
    noisy = truth_amp + sigma * np.random.default_rng(seed).standard_normal(truth_amp.shape)
    return truth_amp, (noisy * np.exp(1j * phase)).astype(np.complex64)


def test_the_solver_agrees_with_scikit_image():
    restoration = pytest.importorskip("skimage.restoration")
    _, obj = _noisy_object()
    image = np.abs(obj).astype(np.float64)
    for weight in (0.01, 0.05, 0.3):
        ours, iterations = tv_denoise(image, weight)
        theirs = restoration.denoise_tv_chambolle(image, weight=weight)
        assert 1 < iterations <= 200
        np.testing.assert_allclose(ours, theirs, atol=1e-9)


def test_the_noise_estimate_finds_white_noise_under_edges_and_needs_enough_pixels():
    truth = _blocks()
    rng = np.random.default_rng(2)
    lit = np.ones(truth.shape, bool)
    for sigma in (0.003, 0.03):
        assert noise_sigma(truth + sigma * rng.standard_normal(truth.shape), lit) == pytest.approx(sigma, rel=0.1)
    assert noise_sigma(truth, lit) == pytest.approx(0.0, abs=1e-12)  # edges alone are not noise
    few = np.zeros(truth.shape, bool)
    few[:8, :8] = True  # 49 whole 2x2 blocks
    assert (8 - 1) ** 2 < MIN_PIXELS and noise_sigma(truth, few) is None


def test_the_prior_removes_noise_from_the_amplitude_and_leaves_the_phase_and_the_rest():
    truth_amp, obj = _noisy_object()
    region = np.zeros(obj.shape, bool)
    region[10:150, 10:150] = True
    out, record = apply_amplitude_prior(obj, region, region, "tv")
    assert record["applied"] and record["weight"] == pytest.approx(0.03, rel=0.15)
    before = np.sqrt(np.mean((np.abs(obj) - truth_amp)[region] ** 2))
    after = np.sqrt(np.mean((np.abs(out) - truth_amp)[region] ** 2))
    assert after < 0.6 * before, (before, after)
    np.testing.assert_allclose(np.angle(out[region]), np.angle(obj[region]), atol=1e-5)
    np.testing.assert_array_equal(out[~region], obj[~region])
    same, none = apply_amplitude_prior(obj, region, region, "none")
    assert same is obj and none == {"rule": "none"}
    dark = np.zeros(obj.shape, bool)
    kept, skipped = apply_amplitude_prior(obj, dark, region, "tv")
    assert kept is obj and not skipped["applied"] and "well-lit" in skipped["why_not"]
    nothing, empty = apply_amplitude_prior(obj, region, dark, "tv")
    assert nothing is obj and "no refined pixel" in empty["why_not"]
    with pytest.raises(ValueError, match="amplitude prior must be one of tv, none"):
        apply_amplitude_prior(obj, region, region, "median")


def test_well_lit_is_a_fraction_of_the_brightest_pixel():
    weight = np.array([[0.0, 0.1, 0.2], [0.5, 1.0, 0.19]])
    np.testing.assert_array_equal(well_lit(weight), [[False, False, True], [True, True, False]])
    assert not well_lit(np.zeros((3, 3))).any()


def test_the_noise_estimate_of_a_large_image_reads_a_strided_sample(monkeypatch):
    from ptycho_runtime.refinement import object_prior

    rng = np.random.default_rng(5)
    image = np.kron(rng.random((40, 40)), np.ones((16, 16))) + 0.02 * rng.standard_normal((640, 640))
    lit = np.ones(image.shape, bool)
    whole = noise_sigma(image, lit)
    monkeypatch.setattr(object_prior, "SAMPLE_BLOCKS", 20_000)  # ~1/20 of the blocks
    sampled = noise_sigma(image, lit)
    assert whole == pytest.approx(0.02, rel=0.05) and sampled == pytest.approx(whole, rel=0.05)
