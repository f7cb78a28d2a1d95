"""The host's object grid in the core runtime: metres, centre, clipping, bad pixels, cancellation, live hooks."""

import threading

import numpy as np
import pytest

import ptycho_runtime as pr
from ptycho_runtime.reconstruction.geometry import ObjectGrid, scan_positions_px


@pytest.fixture(scope="module")
def b1(g1_bundle) -> pr.Bundle:
    return g1_bundle


@pytest.fixture(scope="module")
def scan(g1_scan) -> tuple[np.ndarray, np.ndarray]:
    return g1_scan


def test_object_grid_is_the_ptychodus_convention():
    g = ObjectGrid((101, 51), (1e-7, 2e-7), (3e-6, -2e-6))
    # ptychodus ObjectGeometry.map_probe_positions_to_object_x_px: (x - centre_x)/pixel_width + (W-1)/2
    np.testing.assert_allclose(g.to_pixels(np.array([[3e-6, -2e-6], [4e-6, 0.0]])), [[25.0, 50.0], [35.0, 60.0]])
    pts = np.array([[1.5, 2.5], [-3.0, 90.0]])
    np.testing.assert_allclose(g.to_pixels(g.to_metres(pts)), pts)
    assert g.centre_of((0, 0), (101, 51)) == pytest.approx((3e-6, -2e-6))
    assert ObjectGrid(None, 1e-7).pixel_size_m == (1e-7, 1e-7)
    with pytest.raises(ValueError, match="no pixel_size_m"):
        ObjectGrid((10, 10)).to_pixels(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="shape must be two positive integers"):
        ObjectGrid((0, 10))
    with pytest.raises(ValueError, match="units must be one of"):
        scan_positions_px(np.zeros((1, 2)), 64, units="mm")
    with pytest.raises(ValueError, match="positions in metres need"):
        scan_positions_px(np.zeros((1, 2)), 64, units="metres")


def test_metres_on_a_grid_with_a_centre_match_pixels(b1, scan):
    d, pos = scan
    shape, px, centre = (201, 211), 8e-8, (3e-6, -2e-6)  # odd: the two pixel frames differ by whole pixels
    grid = ObjectGrid(shape, px, centre)
    pos_m = grid.to_metres(pos)  # the same frames, as stage coordinates in metres
    ref = b1.reconstruct(d, pos, object_shape=shape)
    rec = b1.reconstruct(d, pos_m, units="metres", grid=grid)
    np.testing.assert_allclose(rec.object, ref.object, atol=1e-6)
    assert rec.pixel_size_m == (px, px) and rec.centre_m == pytest.approx(centre)
    parts = b1.reconstruct(d, pos_m, units="metres", object_shape=shape, pixel_size_m=px, object_centre_m=centre)
    np.testing.assert_array_equal(parts.object, rec.object)
    # without a shape: canvas sized to the scan, and its centre in metres says where it is
    loose = b1.reconstruct(d, pos_m, units="metres", pixel_size_m=px, object_centre_m=centre)
    H, W = loose.object.shape  # object pixel 0 is at centre_m here: the array centre is x0 + (W-1)/2 from it
    np.testing.assert_allclose(loose.centre_m, [centre[0] + px * (loose.x_coords[0] + (W - 1) / 2),
                                                centre[1] + px * (loose.y_coords[0] + (H - 1) / 2)])
    # the same object as on the fixed grid, in a pixel frame shifted by whole pixels
    rows = (loose.y_coords + (shape[0] - 1) / 2).astype(int)
    cols = (loose.x_coords + (shape[1] - 1) / 2).astype(int)
    ok_r, ok_c = (rows >= 0) & (rows < shape[0]), (cols >= 0) & (cols < shape[1])
    np.testing.assert_allclose(loose.object[np.ix_(ok_r, ok_c)], ref.object[np.ix_(rows[ok_r], cols[ok_c])],
                               atol=1e-6)
    # N/2 positions name the frame half a pixel further on
    n2 = b1.reconstruct(d, pos + 0.5, object_shape=shape, frame_centre="N/2")
    np.testing.assert_allclose(n2.object, ref.object, atol=1e-6)


def test_bad_pixels_are_filled_from_their_neighbours(b1, scan):
    d, pos = scan
    counts = (d * b1.intensity_scale) ** 2
    bad = np.zeros((64, 64), bool)
    bad[10, 12] = bad[40:43, 30:33] = True
    spoiled = counts.copy()
    spoiled[:, bad] = 1e9  # hot pixels
    repaired = pr.repair_bad_pixels(spoiled.astype(np.float32), bad)
    assert np.all(repaired[:, ~bad] == spoiled.astype(np.float32)[:, ~bad])
    assert np.abs(repaired[:, bad]).max() < counts.max() * 1.01  # no hot pixel survives
    # the runtime repairs amplitudes (photon units), so the reference is repaired there too
    ref = b1.reconstruct(pr.repair_bad_pixels(np.sqrt(spoiled).astype(np.float32), bad) ** 2, pos, counts=True)
    rec = b1.reconstruct(spoiled, pos, counts=True, bad_pixels=bad)
    np.testing.assert_allclose(rec.object, ref.object, atol=1e-4)
    hot = b1.reconstruct(spoiled, pos, counts=True)
    assert np.abs(hot.object - ref.object).max() > 10 * np.abs(rec.object - ref.object).max()
    with pytest.raises(ValueError, match=r"bad_pixels must be a boolean \[64, 64\]"):
        b1.reconstruct(d, pos, bad_pixels=np.zeros((32, 32), bool))
    with pytest.raises(ValueError, match="every detector pixel"):
        b1.reconstruct(d, pos, bad_pixels=np.ones((64, 64), bool))


def test_cancel_between_micro_batches_and_live_snapshots(b1, scan):
    d, pos = scan
    stop = threading.Event()
    seen = []

    def on_batch(done, total, snapshot):
        seen.append(done)
        if done >= 16:
            stop.set()

    with pytest.raises(pr.ReconstructionCancelled):
        b1.reconstruct(d, pos, batch_size=8, cancel=stop, on_batch=on_batch)
    assert seen == [8, 16]  # stopped before the third batch ran
    with pytest.raises(pr.ReconstructionCancelled):
        b1.reconstruct(d, pos, batch_size=8, cancel=lambda: True)

    snaps = []
    rec = b1.reconstruct(d, pos, batch_size=16, on_batch=lambda done, total, snap: snaps.append((done, total, snap())))
    assert [s[:2] for s in snaps] == [(16, 48), (32, 48), (48, 48)]
    assert snaps[0][2].covered.sum() < snaps[-1][2].covered.sum()
    np.testing.assert_array_equal(snaps[-1][2].object, rec.object)


def test_streaming_on_a_metre_grid_equals_batch(b1, scan):
    d, pos = scan
    grid = ObjectGrid((200, 210), 8e-8, (1e-6, 1e-6))
    pos_m = grid.to_metres(pos)
    ref = b1.reconstruct(d, pos_m, units="metres", grid=grid, fill=1)
    with b1.stream(grid=grid, units="metres", batch_size=16, background=False, fill=1) as live:
        live.feed(d, pos_m)
    rec = live.snapshot()
    np.testing.assert_allclose(rec.object, ref.object, atol=1e-6)
    assert rec.centre_m == ref.centre_m and rec.pixel_size_m == ref.pixel_size_m
