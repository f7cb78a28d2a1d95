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


# ---------------------------------------------------------------------- refinement while streaming


def _misfit_of(rec, d, pos, probe, N=64):
    """Far-field misfit of a reconstruction against the scan (the refinement's own measure), with ``probe``."""
    from ptycho_runtime.reconstruction.geometry import frame_origin
    from ptycho_runtime.reconstruction.probe_scale import normalise_probe
    from ptycho_runtime.refinement import far_field_misfit

    P, _ = normalise_probe(probe, d, 1.0)
    starts = frame_origin(pos, N) - np.array([rec.x_coords[0], rec.y_coords[0]])
    obj = np.where(rec.covered, rec.object, 1.0).astype(np.complex64)
    return far_field_misfit(obj, d.astype(np.float32), P, starts)


@pytest.mark.parametrize("background", [False, True])
def test_a_refined_stream_fits_the_data_better_and_its_snapshots_are_valid(b1, scan, background):
    d, pos = scan
    probe = b1.probe
    plain = b1.stream(scan_positions=pos, batch_size=8, background=background)
    _feed_chunks(plain, d, pos)
    unrefined = plain.close()
    sweeps, snaps, calls = 6, [], []
    from ptycho_runtime.inference.scan_refinement import RefineSettings

    settings = RefineSettings(sweeps=sweeps, progress=lambda k, n: calls.append((k, n)))
    stream = b1.stream(scan_positions=pos, batch_size=8, background=background, refine=settings, refine_between=1)
    i = 0
    for k in CHUNKS:
        stream.feed(d[i:i + k], pos[i:i + k])
        i += k
        stream.flush()
        snaps.append(stream.snapshot())
    final = stream.close()
    assert stream.frames_done == d.shape[0]
    # mid-scan snapshots: finite, on the final grid, refined once a sweep has run, covering more as frames come
    for snap in snaps:
        assert snap.object.shape == final.object.shape and np.all(np.isfinite(snap.object))
    assert snaps[-1].refinement is not None and snaps[-1].probe is not None
    assert np.count_nonzero(snaps[0].covered) < np.count_nonzero(snaps[-1].covered)
    # the final object: every frame had `sweeps` sweeps after the last ones came; it explains the data better
    rec = final.refinement
    assert rec["streamed"] and rec["sweeps"] == sweeps and rec["sweeps_requested"] == sweeps
    assert rec["frames_refined"] == d.shape[0] and rec["frames_outside_grid"] == 0 and not rec["cancelled"]
    assert rec["sweeps_total"] > sweeps  # sweeps ran between micro-batches too
    # the slow phase was fitted every phase_field_every sweeps of the stream's total, over the frames seen then
    every = settings.phase_field_every
    assert rec["phase_field_every"] == every and [f["after_sweep"] for f in rec["phase_field_fits"]] == list(
        range(every, rec["sweeps_total"] + 1, every))
    # a stream keeps the probe under the default "auto" rule (it cannot rerun); the object goes with that probe
    assert rec["probe_source"] == "the bundle's training probe" and rec["probe_updated"] is False
    assert rec["probe_rule"] == "auto"
    assert rec["amplitude_prior"]["applied"]  # once no sweep is owed
    assert calls and calls[-1] == (sweeps, sweeps)
    better, worse = _misfit_of(final, d, pos, final.probe), _misfit_of(unrefined, d, pos, probe)
    print(f"misfit refined {better:.4g}, network {worse:.4g}")
    assert better < 0.8 * worse, (better, worse)
    np.testing.assert_array_equal(final.object[~final.covered], unrefined.object[~unrefined.covered])  # fill kept
    assert stream.refinement.owed == 0


def test_a_stream_refines_with_the_hosts_probe_and_can_be_cancelled(b1, scan):
    import threading

    d, pos = scan
    host_probe = b1.probe * 3.0  # another absolute scale: normalise_probe brings it to the data's units
    stop = threading.Event()
    with b1.stream(scan_positions=pos, batch_size=16, background=False, refine=4, probe=host_probe,
                   cancel=stop) as stream:
        stream.feed(d[:24], pos[:24])
        stream.flush()
        mid = stream.snapshot()
        assert mid.refinement["probe_source"] == "the host's probe" and not mid.refinement["cancelled"]
        stop.set()
        stream.feed(d[24:], pos[24:])
    final = stream.snapshot()
    assert stream.frames_done == d.shape[0]  # the network went on; refinement stopped
    assert stream.refinement.cancelled and stream.refinement.owed == 0
    assert final.covered.sum() > mid.covered.sum()


def test_refinement_options_are_checked_up_front(b1, scan):
    from ptycho_runtime.inference.scan_refinement import RefineSettings

    d, pos = scan
    with pytest.raises(ValueError, match="refine_between must be an integer >= 0"):
        b1.stream(scan_positions=pos, refine=True, refine_between=-1)
    with pytest.raises(ValueError, match="built-in engine only"):
        b1.stream(scan_positions=pos, refine=RefineSettings(engine="ptychi"))
    with pytest.raises(ValueError, match=r"probe must be \[64, 64\]"):
        b1.stream(scan_positions=pos, refine=True, probe=np.ones((32, 32), np.complex64))
    with pytest.raises(ValueError, match="finite and not all zero"):
        b1.stream(scan_positions=pos, refine=True, probe=np.zeros((64, 64), np.complex64))
    with b1.stream(scan_positions=pos, refine=False, background=False) as off:  # False/0/None: no refinement
        off.feed(d[:4], pos[:4])
    assert off.refinement is None and off.snapshot().refinement is None


def test_an_idle_stream_refines_on_its_own(b1, scan):
    """No frames waiting: the worker sweeps until every frame has had its sweeps, without close() asking."""
    d, pos = scan
    stream = b1.stream(scan_positions=pos, batch_size=16, refine=5, refine_between=0)
    try:
        stream.feed(d, pos)
        stream.flush()
        deadline = time.monotonic() + 60.0  # a loaded CI machine: wait for the sweeps, never assert a time
        while stream.refinement.owed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stream.refinement.owed == 0
        snap = stream.snapshot()
        assert snap.refinement["sweeps"] == 5 and snap.refinement["frames_refined"] == d.shape[0]
    finally:
        final = stream.close()
    assert final.refinement["sweeps_total"] == 5  # close() had nothing left to run


def test_gridsize2_pregrouped_stream_refines_each_frame_once(fixture_dir):
    b = pr.load_bundle(fixture_dir / "n64_g2" / "wts.h5")
    s = read_npz_arrays(fixture_dir / "n64_g2" / "scan.npz")
    pos = np.stack([s["xcoords"], s["ycoords"]], axis=1)[:20]
    d = s["diffraction"][:20]
    idx = group_neighbors(pos[:, 0], pos[:, 1], 2)
    with b.stream(scan_positions=pos, batch_size=4, background=False, refine=3) as stream:
        _feed_chunks(stream, d[idx], pos[idx], chunks=(3, 9, 8))
    final = stream.snapshot()
    r = final.refinement  # each frame once, though pre-grouped input repeats it in several groups
    assert r["frames_refined"] == np.unique(idx).size and r["frames_repeated"] == idx.size - np.unique(idx).size
    assert np.all(np.isfinite(final.object))
