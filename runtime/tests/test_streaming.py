"""StreamingReconstructor: chunked feeding equals batch reconstruct; snapshots; latency flush; errors."""

from __future__ import annotations

import time

import numpy as np
import pytest

import ptycho_runtime as pr
from ptycho_runtime.files.npz import read_npz_arrays
from ptycho_runtime.reconstruction.grouping import group_neighbors

CHUNKS = (5, 1, 17, 3, 22)  # uneven, sums to 48 (the fixture scan)


@pytest.fixture(scope="module")
def b1(g1_bundle) -> pr.Bundle:
    return g1_bundle


@pytest.fixture(scope="module")
def scan(g1_scan) -> tuple[np.ndarray, np.ndarray]:
    assert g1_scan[0].shape[0] == sum(CHUNKS)
    return g1_scan


@pytest.fixture(scope="module")
def reference(b1, scan):
    return b1.reconstruct(*scan)


def _feed_chunks(stream, d, pos, chunks=CHUNKS):
    i = 0
    for k in chunks:
        stream.feed(d[i:i + k], pos[i:i + k])
        i += k


@pytest.mark.parametrize("background", [True, False])
def test_uneven_chunks_equal_reconstruct(b1, scan, reference, background):
    d, pos = scan
    stream = b1.stream(scan_positions=pos, batch_size=8, max_latency_s=0.02, background=background)
    _feed_chunks(stream, d, pos)
    final = stream.close()
    assert stream.frames_done == d.shape[0] and stream.pending == 0
    assert stream.batches_done >= 1 and len(stream.latencies_s) == stream.batches_done
    np.testing.assert_array_equal(final.x_coords, reference.x_coords)
    np.testing.assert_array_equal(final.y_coords, reference.y_coords)
    np.testing.assert_allclose(final.weight, reference.weight, rtol=0, atol=1e-9)
    np.testing.assert_allclose(final.object, reference.object, rtol=0, atol=1e-6)
    assert stream.close() is not None  # a second close is harmless


def test_gridsize2_pregrouped_stream_equals_reconstruct(fixture_dir):
    b = pr.load_bundle(fixture_dir / "n64_g2" / "wts.h5")
    s = read_npz_arrays(fixture_dir / "n64_g2" / "scan.npz")
    pos = np.stack([s["xcoords"], s["ycoords"]], axis=1)[:20]
    d = s["diffraction"][:20]
    ref = b.reconstruct(d, pos)
    idx = group_neighbors(pos[:, 0], pos[:, 1], 2)
    with b.stream(scan_positions=pos, batch_size=4) as stream:
        _feed_chunks(stream, d[idx], pos[idx], chunks=(3, 9, 8))
    final = stream.snapshot()
    np.testing.assert_allclose(final.object, ref.object, rtol=0, atol=1e-6)


def test_object_shape_grid(b1, scan):
    d, pos = scan
    shift = pos - pos.min(axis=0) + 40  # positions in a (H, W) object frame
    H, W = (np.ceil(shift.max(axis=0)) + 40).astype(int)[::-1]
    ref = b1.reconstruct(d, shift, object_shape=(H, W))
    with b1.stream(object_shape=(H, W), batch_size=16, background=False) as stream:
        _feed_chunks(stream, d, shift)
    np.testing.assert_allclose(stream.snapshot().object, ref.object, rtol=0, atol=1e-6)


def test_snapshot_mid_stream_is_partial(b1, scan):
    d, pos = scan
    with b1.stream(scan_positions=pos, batch_size=8) as stream:
        stream.feed(d[:10], pos[:10])
        stream.flush()
        part = stream.snapshot()
        assert stream.frames_done == 10
        stream.feed(d[10:], pos[10:])
    final = stream.snapshot()
    assert 0 < np.count_nonzero(part.covered) < np.count_nonzero(final.covered)
    assert part.object.shape == final.object.shape


def test_max_latency_flushes_a_trickle(b1, scan):
    d, pos = scan
    latency = 0.05
    stream = b1.stream(scan_positions=pos, batch_size=32, max_latency_s=latency)
    try:
        stream.feed(d[:3], pos[:3])  # far fewer than batch_size
        time.sleep(3 * latency)
        deadline = time.monotonic() + 10.0  # a loaded CI machine may need longer than 3×latency for inference
        while stream.frames_done < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        snap = stream.snapshot()  # no flush() called
        assert stream.frames_done == 3 and stream.pending == 0
        assert snap.covered.any()
    finally:
        stream.close()


def test_errors(b1, scan):
    d, pos = scan
    with pytest.raises(ValueError, match="exactly one of scan_positions.*or object_shape"):
        b1.stream()
    with pytest.raises(ValueError, match="exactly one of scan_positions"):
        b1.stream(scan_positions=pos, object_shape=(100, 100))
    with pytest.raises(ValueError, match=r"batch_size must be >= 1 \(got 0\)"):
        b1.stream(scan_positions=pos, batch_size=0)
    with pytest.raises(ValueError, match="max_latency_s must be > 0"):
        b1.stream(scan_positions=pos, max_latency_s=0)

    stream = b1.stream(object_shape=(128, 128), batch_size=4, out_of_grid="raise")
    try:
        # rejected at feed time (not later, in the worker): the stream stays usable
        with pytest.raises(ValueError, match=r"fall outside the 128×128 canvas"):
            stream.feed(d[:2], np.array([[60.0, 60.0], [400.0, 60.0]]))
        with pytest.raises(ValueError, match=r"trained with N=64"):
            stream.feed(np.ones((2, 32, 32), np.float32), np.zeros((2, 2)))
        with pytest.raises(ValueError, match=r"positions must have shape \[2, 2\]"):
            stream.feed(d[:2], np.zeros((3, 2)))
        stream.feed(d[:2], np.array([[60.0, 60.0], [64.0, 62.0]]))
    finally:
        result = stream.close()
    assert stream.frames_done == 2 and result.covered.any()
    with pytest.raises(RuntimeError, match=r"feed\(\) after close\(\)"):
        stream.feed(d[:1], pos[:1])
