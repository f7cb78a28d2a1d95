"""Stitching: exact reproduction at integer positions, bilinear splatting, weighting, errors (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from ptycho_runtime.reconstruction.stitching import StitchCanvas, canvas_bounds, stitch_patches

N = 16


def _object(shape=(80, 96), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 1.0, shape) * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))).astype(np.complex64)


def _extract(obj: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """patch[r, c] = obj[y - (N-1)/2 + r, x - (N-1)/2 + c] where that start is an integer: plain slicing."""
    out = np.empty((len(pos), N, N), obj.dtype)
    starts = pos - (N - 1) / 2
    assert np.all(starts == np.round(starts))
    for k, (x, y) in enumerate(starts.astype(int)):
        out[k] = obj[y: y + N, x: x + N]
    return out


def _grid_positions(shape, step=5, margin=N // 2 + 1) -> np.ndarray:
    ys = np.arange(margin, shape[0] - margin, step)
    xs = np.arange(margin, shape[1] - margin, step)
    return np.array([(x, y) for y in ys for x in xs], dtype=np.float64) - 0.5  # whole-pixel frame starts


@pytest.mark.parametrize("crop", [N, N // 2])
def test_integer_positions_reproduce_object(crop):
    obj = _object()
    pos = _grid_positions(obj.shape)
    rec = stitch_patches(_extract(obj, pos), pos, object_shape=obj.shape, crop=crop)
    assert rec.object.shape == obj.shape and rec.object.dtype == np.complex64
    cov = rec.covered
    # the interior of the scan is covered; there the known object comes back exactly (float rounding only)
    lo, hi = N // 2 + 1, -(N // 2 + 1)
    assert cov[lo + N // 2:hi - N // 2, lo + N // 2:hi - N // 2].all()
    np.testing.assert_allclose(rec.object[cov], obj[cov], rtol=0, atol=1e-6)
    assert np.all(rec.object[~cov] == 0) and np.all(rec.weight[~cov] == 0)
    np.testing.assert_array_equal(rec.x_coords, np.arange(obj.shape[1]))
    np.testing.assert_array_equal(rec.y_coords, np.arange(obj.shape[0]))
    np.testing.assert_allclose(rec.amplitude[cov], np.abs(obj[cov]), atol=1e-6)
    np.testing.assert_allclose(np.exp(1j * rec.phase[cov]), np.exp(1j * np.angle(obj[cov])), atol=1e-5)


def test_scan_sized_canvas_matches_object_frame():
    obj = _object()
    pos = _grid_positions(obj.shape)
    patches = _extract(obj, pos)
    full = stitch_patches(patches, pos, object_shape=obj.shape)
    fit = stitch_patches(patches, pos)  # canvas sized to the scan; x/y_coords say where it sits
    x0, y0 = int(fit.x_coords[0]), int(fit.y_coords[0])
    (ox, oy), (H, W) = canvas_bounds(pos, N)
    assert (x0, y0) == (ox, oy) and fit.object.shape == (H, W)
    sub = full.object[y0:y0 + H, x0:x0 + W] if x0 >= 0 and y0 >= 0 else None
    assert sub is not None and sub.shape == fit.object.shape
    np.testing.assert_allclose(fit.object, sub, atol=1e-7)


def test_half_pixel_shift_is_bilinear_splat():
    rng = np.random.default_rng(1)
    patch = (rng.normal(size=(N, N)) + 1j * rng.normal(size=(N, N))).astype(np.complex64)
    rec = stitch_patches(patch[None], np.array([[20.0, 19.5]]), object_shape=(48, 48), crop=N)
    c0 = int(np.floor(20.0 - (N - 1) / 2))  # 12: patch column c lands half on 12 + c, half on 13 + c
    r0 = int(19.5 - (N - 1) / 2)
    rows = slice(r0, r0 + N)
    np.testing.assert_allclose(rec.weight[rows, c0], 0.5)
    np.testing.assert_allclose(rec.weight[rows, c0 + N], 0.5)
    np.testing.assert_allclose(rec.weight[rows, c0 + 1:c0 + N], 1.0)
    np.testing.assert_allclose(rec.object[rows, c0], patch[:, 0], atol=1e-6)
    np.testing.assert_allclose(rec.object[rows, c0 + N], patch[:, -1], atol=1e-6)
    np.testing.assert_allclose(rec.object[rows, c0 + 1:c0 + N], (patch[:, :-1] + patch[:, 1:]) / 2, atol=1e-6)
    assert rec.weight.sum() == pytest.approx(N * N)  # splatting conserves weight
    # a half-pixel shift in y as well: four-way split, total weight still N²
    rec = stitch_patches(patch[None], np.array([[20.0, 20.0]]), object_shape=(48, 48), crop=N)
    assert rec.weight.sum() == pytest.approx(N * N)
    assert rec.weight[r0, c0] == pytest.approx(0.25) and rec.object[r0, c0] == pytest.approx(patch[0, 0], abs=1e-6)


def test_constant_object_survives_any_subpixel_scan():
    rng = np.random.default_rng(2)
    pos = rng.uniform(N, 60 - N, size=(30, 2))
    value = np.complex64(0.7 * np.exp(0.3j))
    rec = stitch_patches(np.full((30, N, N), value), pos, object_shape=(60, 60))
    np.testing.assert_allclose(rec.object[rec.covered], value, atol=1e-6)


def test_window_weighting():
    rng = np.random.default_rng(3)
    window = rng.uniform(0.1, 1.0, (N, N))
    window[:2] = 0.0  # zero rows of the window are never stitched
    a, b = 1.0 + 0.5j, -0.25 + 2.0j
    pos = np.array([[19.5, 19.5], [22.5, 20.5]])  # whole-pixel frame starts (12, 12), (15, 13): no splitting
    rec = stitch_patches(np.stack([np.full((N, N), a), np.full((N, N), b)]), pos, object_shape=(48, 48),
                         window=window)
    wa = np.zeros((48, 48))
    wb = np.zeros((48, 48))
    wa[12:28, 12:28] = window
    wb[13:29, 15:31] = window
    np.testing.assert_allclose(rec.weight, wa + wb, atol=1e-12)
    both = (wa > 0) | (wb > 0)
    expected = np.zeros((48, 48), complex)
    expected[both] = ((wa * a + wb * b)[both]) / (wa + wb)[both]
    np.testing.assert_allclose(rec.object, expected, atol=1e-6)
    assert not rec.covered[12:14, 12:15].any()  # only window rows 0-1 of patch a reach there


def test_add_in_parts_equals_one_call():
    rng = np.random.default_rng(4)
    n = 37
    pos = rng.uniform(N, 90 - N, size=(n, 2))
    patches = (rng.normal(size=(n, N, N)) + 1j * rng.normal(size=(n, N, N))).astype(np.complex64)
    one = StitchCanvas.for_positions(pos, N)
    one.add(patches, pos)
    parts = StitchCanvas.for_positions(pos, N)
    order = rng.permutation(n)
    for chunk in np.split(order, [1, 5, 6, 20]):
        parts.add(patches[chunk], pos[chunk])
    parts.add(patches[:0], pos[:0])  # empty adds are fine
    assert one.n_patches == parts.n_patches == n
    r1, r2 = one.result(), parts.result()
    np.testing.assert_allclose(r2.weight, r1.weight, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r2.object, r1.object, rtol=0, atol=1e-6)
    # result() is a copy: later adds do not change an earlier result
    snap = parts.result()
    parts.add(patches[:3], pos[:3])
    np.testing.assert_array_equal(snap.weight, r2.weight)


def test_grouped_shapes_flatten():
    obj = _object()
    pos = _grid_positions(obj.shape)[:12]
    patches = _extract(obj, pos)
    flat = stitch_patches(patches, pos, object_shape=obj.shape)
    grouped = stitch_patches(patches.reshape(3, 4, N, N), pos.reshape(3, 4, 2), object_shape=obj.shape)
    np.testing.assert_array_equal(flat.object, grouped.object)


def test_canvas_bounds_cover_every_patch():
    pos = np.array([[0.3, -5.2], [17.9, 40.0]])
    (x0, y0), (H, W) = canvas_bounds(pos, N)
    c = (N - 1) / 2  # frame pixel c is the position; the frame spans [pos - c, pos + c] (+1 for bilinear)
    assert x0 <= np.floor(pos[:, 0].min() - c) and y0 <= np.floor(pos[:, 1].min() - c)
    assert x0 + W - 1 >= np.ceil(pos[:, 0].max() + c) + 1 and y0 + H - 1 >= np.ceil(pos[:, 1].max() + c) + 1
    canvas = StitchCanvas.for_positions(pos, N, crop=N)
    canvas.add(np.ones((2, N, N), np.complex64), pos)  # fits, even with a full-patch crop
    canvas.check_inside(pos)


def test_bad_shapes_and_values():
    canvas = StitchCanvas((40, 40), N, out_of_grid="raise")
    good = np.ones((2, N, N), np.complex64)
    pos = np.array([[20.0, 20.0], [21.0, 19.0]])
    with pytest.raises(ValueError, match=r"patches must have shape \[n, 16, 16\] \(got \[2, 8, 8\]\)"):
        canvas.add(np.ones((2, 8, 8)), pos)
    with pytest.raises(ValueError, match=r"patches must have shape \[n, 16, 16\]"):
        canvas.add(np.ones((N, N)), pos[:1])
    with pytest.raises(ValueError, match=r"positions must have shape \[2, 2\] as \(x, y\).*got \[3, 2\]"):
        canvas.add(good, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="positions contain NaN or inf"):
        canvas.add(good, np.array([[20.0, np.nan], [20.0, 20.0]]))
    with pytest.raises(ValueError, match=r"1 patch\(es\) fall outside the 40×40 canvas"):
        canvas.add(good, np.array([[20.0, 20.0], [39.0, 20.0]]))
    with pytest.raises(ValueError, match="fall outside"):
        canvas.check_inside(np.array([[-2.0, 20.0]]))
    assert canvas.n_patches == 0 and not canvas.result().covered.any()  # failed adds changed nothing
    with pytest.raises(ValueError, match=r"window must have shape \(16, 16\)"):
        StitchCanvas((40, 40), N, window=np.ones((8, 8)))
    with pytest.raises(ValueError, match="window must be finite and non-negative"):
        StitchCanvas((40, 40), N, window=-np.ones((N, N)))
    for crop in (0, N + 1):
        with pytest.raises(ValueError, match=r"crop must be in 1\.\.16"):
            StitchCanvas((40, 40), N, crop=crop)
    with pytest.raises(ValueError, match=r"patches must have shape \[n, N, N\] or \[n, C, N, N\]"):
        stitch_patches(np.ones((N, N)), np.zeros((1, 2)))


def test_clipped_patches_keep_their_inside_pixels():
    """A patch overhanging the grid's edge contributes exactly its inside pixels (as on a larger canvas)."""
    rng = np.random.default_rng(3)
    patches = (rng.normal(size=(3, N, N)) + 1j * rng.normal(size=(3, N, N))).astype(np.complex64)
    pos = np.array([[2.25, 20.0], [20.0, 38.5], [200.0, 20.0]])  # over the left edge, the bottom edge, far away
    small = StitchCanvas((40, 40), N, crop=N, fill=1 + 0j)
    small.add(patches, pos)
    big = StitchCanvas((80, 80), N, origin=(-20, -20), crop=N, out_of_grid="drop")
    big.add(patches[:2], pos[:2])
    got, ref = small.result(), big.result()
    assert (got.n_clipped, got.n_dropped, got.object.shape) == (2, 1, (40, 40))
    np.testing.assert_allclose(got.weight, ref.weight[20:60, 20:60], atol=1e-12)
    inside = got.covered
    np.testing.assert_allclose(got.object[inside], ref.object[20:60, 20:60][inside], rtol=1e-6)
    assert np.all(got.object[~inside] == 1 + 0j)  # uncovered pixels take the fill value (ptychodus: 1+0j)
    with pytest.raises(ValueError, match="out_of_grid must be one of"):
        StitchCanvas((40, 40), N, out_of_grid="wrap")


def test_a_whole_pixel_patch_flush_with_the_far_edges_is_inside_and_exact():
    """Its bilinear box (one pixel wider) would leave the canvas; the extra row and column weigh 0."""
    obj = _object((40, 40), seed=4)
    pos = np.array([[40 - N + (N - 1) / 2, 40 - N + (N - 1) / 2], [(N - 1) / 2, 40 - N + (N - 1) / 2]])
    canvas = StitchCanvas((40, 40), N, crop=N, out_of_grid="raise")
    canvas.add(_extract(obj, pos), pos)
    got = canvas.result()
    assert got.n_clipped == 0 and got.covered[-N:, -N:].all() and got.covered[-N:, :N].all()
    np.testing.assert_allclose(got.object[-N:, -N:], obj[-N:, -N:], rtol=1e-6)
