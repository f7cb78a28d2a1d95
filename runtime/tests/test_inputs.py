"""Every bad input a host can send gets a clear error, and the Bundle keeps working afterwards."""

from __future__ import annotations

import numpy as np
import pytest

import ptycho_runtime as pr
from ptycho_runtime.reconstruction.inputs import check_positions, check_scan_positions, prepare_diffraction
from ptycho_runtime.reconstruction.stitching import MAX_CANVAS_PIXELS, StitchCanvas


@pytest.fixture(scope="module")
def b1(fixture_dir) -> pr.Bundle:
    return pr.load_bundle(fixture_dir / "n64_g1" / "wts.h5")


@pytest.fixture(scope="module")
def b2(fixture_dir) -> pr.Bundle:
    return pr.load_bundle(fixture_dir / "n64_g2" / "wts.h5")


def _good(b: pr.Bundle, n: int = 2) -> np.ndarray:
    x = b.contents.parity["b3"]["input.amplitude"]
    return np.concatenate([x] * -(-n // len(x)))[:n].copy()  # tests edit it in place


@pytest.fixture
def still_works(b1, b2):
    """After the test body: both bundles still predict the stored eager outputs."""
    yield
    for b in (b1, b2):
        par = b.contents.parity["b1"]
        ref = par["diffraction_to_obj.amplitude"] * np.exp(1j * par["diffraction_to_obj.phase"])
        np.testing.assert_allclose(b.predict(par["input.amplitude"]), ref,
                                   rtol=0, atol=1e-4 * max(1.0, np.abs(ref).max()))


pytestmark = pytest.mark.usefixtures("still_works")


def test_wrong_ndim(b1, b2):
    with pytest.raises(ValueError, match=r"must have shape \[n, 1, 64, 64\] or \[n, 64, 64\], got \[64, 64\]"):
        b1.predict(np.ones((64, 64), np.float32))
    with pytest.raises(ValueError, match=r"got \[1, 2, 1, 64, 64\]"):
        b1.predict(np.ones((1, 2, 1, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"must have shape \[n, 4, 64, 64\], got \[3, 64, 64\]"):
        b2.predict(np.ones((3, 64, 64), np.float32))  # flat frames need positions to be grouped


def test_wrong_N_mentions_trained_N(b1, b2):
    with pytest.raises(ValueError, match=r"got \[2, 1, 32, 32\].*trained with N=64.*64×64"):
        b1.predict(np.ones((2, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"trained with N=64"):
        b2.predict(np.ones((2, 4, 128, 128), np.float32))


def test_wrong_channel_count(b1, b2):
    with pytest.raises(ValueError, match=r"\[n, 4, 64, 64\], got \[2, 1, 64, 64\] \(C = gridsize² = 4"):
        b2.predict(np.ones((2, 1, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"C = gridsize² = 1"):
        b1.predict(np.ones((2, 4, 64, 64), np.float32))


def test_complex_and_non_numeric_dtypes(b1):
    with pytest.raises(TypeError, match=r"real float or integer array \(got dtype complex64\).*not complex"):
        b1.predict(np.ones((2, 64, 64), np.complex64))
    with pytest.raises(TypeError, match="got dtype bool"):
        b1.predict(np.ones((2, 64, 64), bool))


def test_nan_and_inf_frames_reported_by_index(b1):
    x = _good(b1, 5)
    x[3, 0, 10, 10] = np.nan
    with pytest.raises(ValueError, match=r"1 frame\(s\) contain NaN or inf \(first: index 3\)"):
        b1.predict(x)
    x[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 frame\(s\).*first: index 1"):
        b1.predict(x)


def test_negative_values(b1):
    x = _good(b1, 4)
    x[2, 0, 5, 5] = -0.1
    with pytest.raises(ValueError, match=r"1 frame\(s\) have negative amplitudes \(first: index 2\).*clipping"):
        b1.predict(x)
    with pytest.raises(ValueError, match=r"negative counts \(first: index 2\)"):
        b1.predict(x, counts=True)


def test_empty_input(b1):
    with pytest.raises(ValueError, match=r"no frames \(n = 0\)"):
        b1.predict(np.zeros((0, 64, 64), np.float32))


def test_input_not_modified(b1):
    x = _good(b1, 3)
    before = x.copy()
    b1.predict(x)
    b1.predict(x, counts=True)
    np.testing.assert_array_equal(x, before)


def test_positions_count_mismatch(b1, b2):
    x = _good(b1, 5)[:, 0]
    with pytest.raises(ValueError, match=r"positions must have shape \[5, 2\] as \(x, y\).*got \[4, 2\]"):
        b1.reconstruct(x, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"positions must have shape \[5, 2\].*got \[5, 3\]"):
        b2.reconstruct(x, np.zeros((5, 3)))
    g = _good(b2, 3)
    with pytest.raises(ValueError, match=r"\[3, 4, 2\] \(or \[3, 2\] with frames \[3, N, N\]\).*got \[3, 2\]"):
        b2.reconstruct(g, np.zeros((3, 2)))
    with pytest.raises(TypeError, match="positions must be a real numeric array"):
        b1.reconstruct(x, np.zeros((5, 2), np.complex128))


def test_positions_nan(b1, b2):
    x = _good(b1, 5)[:, 0]
    pos = np.arange(10, dtype=float).reshape(5, 2) * 10
    pos[2, 1] = np.nan
    with pytest.raises(ValueError, match="positions contain NaN or inf"):
        b1.reconstruct(x, pos)
    with pytest.raises(ValueError, match="positions contain NaN or inf"):
        b2.reconstruct(x, pos)


def test_offsets_wrong_shape(b1, b2):
    x = _good(b1, 2)
    with pytest.raises(ValueError, match=r"offsets must have shape \[2, 1, 1, 2\].*got \[2, 2\]"):
        b1.predict(x, offsets=np.zeros((2, 2)))
    g = _good(b2, 2)
    with pytest.raises(ValueError, match=r"offsets must have shape \[2, 4, 1, 2\].*got \[2, 4, 2\]"):
        b2.predict(g, offsets=np.zeros((2, 4, 2)))
    b2.predict(g, offsets=np.zeros((2, 4, 1, 2), np.float32))  # the right shape is accepted


def test_object_shape_too_small(b1):
    """Patches beyond the host's grid are clipped or dropped and counted, never an error (unless asked for)."""
    x = _good(b1, 3)[:, 0]
    pos = np.array([[10.0, 10.0], [30.0, 30.0], [500.0, 30.0]])  # partly, partly, wholly outside 40×40
    rec = b1.reconstruct(x, pos, object_shape=(40, 40), window=None)
    assert rec.object.shape == (40, 40) and (rec.n_clipped, rec.n_dropped) == (2, 1) and rec.covered.any()
    rec = b1.reconstruct(x, pos, object_shape=(40, 40), window=None, out_of_grid="drop", fill=1)
    assert (rec.n_clipped, rec.n_dropped) == (0, 3) and not rec.covered.any() and np.all(rec.object == 1)
    with pytest.raises(ValueError, match=r"2 patch\(es\) fall outside the 40×40 canvas"):
        b1.reconstruct(x[:2], pos[:2], object_shape=(40, 40), out_of_grid="raise")


def test_helpers_directly():
    frames = np.full((2, 8, 8), 4, np.uint16)
    frames[:, 0, 0] = 9
    x = prepare_diffraction(frames, 8, 1, counts=True, intensity_scale=123.0)
    assert x.dtype == np.float32 and x.shape == (2, 1, 8, 8) and np.all(x[:, 0, 1:] == 2.0) and x[0, 0, 0, 0] == 3
    amp = np.full((2, 8, 8), 0.5)
    amp[:, 3, 3] = 0.25
    x = prepare_diffraction(amp, 8, 1, counts=False, intensity_scale=10.0)
    assert np.all(x[:, 0, 0] == 5.0) and x[1, 0, 3, 3] == 2.5
    pos = check_positions(np.zeros((3, 2), np.int32), 3, 1)
    assert pos.dtype == np.float64 and pos.shape == (3, 1, 2)


# --------------------------------------------------------------------------- unit guards


def _raster(n_side: int = 6, step: float = 8.0) -> np.ndarray:
    g = np.arange(n_side, dtype=float) * step + 40
    return np.stack([np.tile(g, n_side), np.repeat(g, n_side)], axis=1)


def test_raw_counts_are_refused_unless_told(b1):
    counts = np.random.default_rng(0).poisson(50.0, (4, 64, 64)).astype(np.uint16)
    with pytest.raises(ValueError, match=r"whole numbers up to \d+: they look like raw detector counts.*counts=True"):
        b1.predict(counts)
    with pytest.raises(ValueError, match="look like raw detector counts"):
        b1.reconstruct(counts, _raster()[:4])
    assert b1.predict(counts, counts=True).shape == (4, 1, 64, 64)  # told: counts
    assert b1.predict(counts.astype(np.float32), counts=False).shape == (4, 1, 64, 64)  # told: amplitudes


def test_all_zero_and_constant_frames_are_refused_by_index(b1):
    x = _good(b1, 6)
    x[2] = 0.0
    with pytest.raises(ValueError, match=r"1 of 6 frame\(s\) are all zero \(indices 2\).*Drop those frames"):
        b1.predict(x)
    x[4] = 0.3
    with pytest.raises(ValueError, match=r"2 of 6 frame\(s\) are all zero or constant \(indices 2, 4\)"):
        b1.reconstruct(x[:, 0], _raster()[:6])


def test_positions_in_metres_are_refused(b1):
    x = _good(b1, 7)[:, 0]
    metres = _raster()[:7] * 20e-9  # 20 nm pixels, positions left in metres
    with pytest.raises(ValueError, match=r"span only .* pixels, so every patch lands on one spot.*look like "
                                         r"metres.*positions_from_metres"):
        b1.reconstruct(x, metres)
    np.testing.assert_allclose(pr.positions_from_metres(metres[:, 0], metres[:, 1], 20e-9),
                               _raster()[:7] - _raster()[:7].min(axis=0), atol=1e-9)


@pytest.mark.parametrize("outlier", [3e4, 1e9])
def test_one_outlier_position_is_refused_before_any_allocation(b1, outlier):
    x = _good(b1, 7)[:, 0]
    pos = _raster()[:7].copy()
    pos[5, 0] = outlier
    with pytest.raises(ValueError, match=r"1 of 7 scan position\(s\) \(indices 5; .*\) lie .* pixels in x from the "
                                         r"rest of the scan.*Drop those frames"):
        b1.reconstruct(x, pos)


def test_canvas_cap(b1):
    x = _good(b1, 7)[:, 0]
    with pytest.raises(ValueError, match=r"its canvas would hold .* pixels, more than the cap of 1000"):
        b1.reconstruct(x, _raster()[:7], max_canvas_pixels=1000)
    with pytest.raises(ValueError, match=r"holds more than \d+ pixels \(the cap\).*Crop the scan"):
        StitchCanvas((100_000, 100_000), 64)  # 80 GB of accumulators: refused before np.zeros
    check_scan_positions(_raster(20, 30.0), 64)  # a 600-pixel scan: fine by default
    with pytest.raises(ValueError, match=rf"more than the cap of 10000 \({MAX_CANVAS_PIXELS} by default\)"):
        check_scan_positions(_raster(20, 30.0), 64, max_canvas_pixels=10_000)


def test_stream_refuses_planned_positions_in_metres(b1):
    with pytest.raises(ValueError, match="look like metres"):
        b1.stream(scan_positions=_raster() * 1e-8)
