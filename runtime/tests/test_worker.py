"""BundleWorker: one warm process per bundle; progress, cancellation, errors and a dead worker, as a host sees them."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest

import ptycho_runtime as pr
from ptycho_runtime.files.npz import read_npz_arrays
from ptycho_runtime.hosts.worker import BundleWorker, Done, Progress, WorkerError


@pytest.fixture(scope="module")
def scan(fixture_dir) -> tuple[np.ndarray, np.ndarray]:
    s = read_npz_arrays(fixture_dir / "n64_g1" / "scan.npz")
    return s["diffraction"], np.stack([s["xcoords"], s["ycoords"]], axis=1)


@pytest.fixture(scope="module")
def worker(fixture_dir):
    with BundleWorker(fixture_dir / "n64_g1" / "wts.h5", device="cpu") as w:
        yield w


def test_same_result_as_in_process_and_loaded_once(worker, scan, fixture_dir, caplog):
    d, pos = scan
    ref = pr.load_bundle(fixture_dir / "n64_g1" / "wts.h5", device="cpu").reconstruct(d, pos, object_shape=(200, 200))
    pid = worker.pid
    caplog.set_level(logging.DEBUG, logger="ptycho_runtime")
    for _ in range(2):
        rec = worker.reconstruct(d, pos, object_shape=(200, 200))
        np.testing.assert_array_equal(rec.object, ref.object)
    assert (worker.pid, worker.starts) == (pid, 1) and worker.alive  # one process, one load, warm
    assert worker.info.N == 64 and worker.load_seconds > 0
    assert not any("loaded" in r.getMessage() for r in caplog.records)
    assert sum("[worker] reconstructed 48 frame group" in r.getMessage() for r in caplog.records) == 2


def test_progress_snapshots_then_done(worker, scan):
    d, pos = scan
    events = list(worker.run(d, pos, batch_size=16))
    assert [type(e) for e in events] == [Progress, Progress, Progress, Done]
    assert [e.done for e in events[:3]] == [16, 32, 48] and events[0].total == 48
    assert events[0].snapshot.covered.sum() < events[2].snapshot.covered.sum()
    np.testing.assert_array_equal(events[2].snapshot.object, events[3].reconstruction.object)
    assert all(e.snapshot is None for e in worker.run(d, pos, batch_size=16, snapshots=False)
               if isinstance(e, Progress))


def test_errors_keep_their_type_and_the_worker(worker, scan):
    d, pos = scan
    with pytest.raises(ValueError, match="trained with N=64"):
        worker.reconstruct(d[:, :32, :32], pos)
    with pytest.raises(TypeError, match="not available through a worker"):
        worker.reconstruct(d, pos, progress=print)
    assert worker.reconstruct(d, pos).covered.any()  # still serving


def test_cancel_between_micro_batches(worker, scan):
    d, pos = scan
    events = worker.run(d, pos, batch_size=4)
    assert isinstance(next(events), Progress)
    events.close()  # the host stops listening: the job is cancelled and drained
    events = worker.run(d, pos, batch_size=4)
    next(events)
    threading.Timer(0.0, worker.cancel).start()
    with pytest.raises(pr.ReconstructionCancelled):
        for _ in events:
            pass
    assert worker.reconstruct(d, pos).covered.any() and worker.starts == 1


def _wait_until_dead(worker: BundleWorker) -> None:
    deadline = time.monotonic() + 30
    while worker.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not worker.alive


@pytest.mark.parametrize("seen_dead", [False, True], ids=["killed-just-before", "seen-dead-before"])
def test_a_worker_dead_between_calls_is_reported_then_replaced(fixture_dir, scan, seen_dead):
    """Whether or not the parent has seen the exit yet when the call starts, the death is reported once."""
    d, pos = scan
    with BundleWorker(fixture_dir / "n64_g1" / "wts.h5", device="cpu") as w:
        first = w.pid
        os.kill(first, signal.SIGKILL)
        if seen_dead:
            _wait_until_dead(w)
        with pytest.raises(WorkerError, match="died|stopped"):
            w.reconstruct(d, pos)
        assert w.reconstruct(d, pos).covered.any() and w.starts == 2 and w.pid != first


def test_a_worker_killed_during_a_call_is_reported_then_replaced(fixture_dir, scan):
    d, pos = scan
    with BundleWorker(fixture_dir / "n64_g1" / "wts.h5", device="cpu") as w:
        first = w.pid
        events = w.run(d, pos, batch_size=4, refine=500)
        assert isinstance(next(events), Progress)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(WorkerError, match="died"):
            for _ in events:
                pass
        assert not w.alive
        assert w.reconstruct(d, pos).covered.any() and w.starts == 2 and w.pid != first


def test_a_bad_bundle_fails_at_start_with_its_own_error(tmp_path):
    bad = tmp_path / "wts.h5"
    bad.write_bytes(b"not a bundle")
    with pytest.raises(pr.BundleFormatError, match="not an HDF5 file"):
        BundleWorker(bad, device="cpu").start()


def test_errors_cross_back_as_data_and_only_known_types_are_rebuilt():
    """No pickled objects come back from the worker: only built-in and ptycho_runtime exception types are rebuilt."""
    from ptycho_runtime.hosts.worker import _pack, _raise

    spec, name, text = _pack(pr.BundleFormatError("not an HDF5 file: x.h5"))
    assert spec == ("ptycho_runtime.format.errors", "BundleFormatError", ("not an HDF5 file: x.h5",))
    with pytest.raises(pr.BundleFormatError, match="not an HDF5 file"):
        _raise(("error", 1, spec, name, text))
    with pytest.raises(ValueError, match="plain"):
        _raise(("error", 1, _pack(ValueError("plain"))[0], "ValueError", ""))
    # a type from elsewhere is reported as text, never imported or built
    with pytest.raises(WorkerError, match="the worker raised CalledProcessError"):
        _raise(("error", 1, ("subprocess", "CalledProcessError", (1, "x")), "CalledProcessError", "tb"))
    assert _pack(ValueError(object()))[0] is None  # arguments that are not plain data: text only


def test_refinement_crosses_the_process_boundary_as_plain_data(worker, scan, fixture_dir):
    """refine= as a dict (or settings without progress) reaches the worker; each sweep comes back as progress."""
    from ptycho_runtime.hosts.worker import plain_refine
    from ptycho_runtime.inference.scan_refinement import RefineSettings

    d, pos = scan
    bundle = pr.load_bundle(fixture_dir / "n64_g1" / "wts.h5", device="cpu")
    probe = bundle.probe * 2.0  # the host's probe, at its own scale
    # max_sweeps=0: exactly the 3 sweeps asked (this scan's fit stays above PROBE_SUSPECT, which would extend them)
    ref = bundle.reconstruct(d, pos, refine=RefineSettings(sweeps=3, refine_probe=True, max_sweeps=0), probe=probe)
    events = list(worker.run(d, pos, batch_size=16, refine={"sweeps": 3, "refine_probe": True, "max_sweeps": 0},
                             probe=probe))
    sweeps = [e for e in events if isinstance(e, Progress) and e.stage == "refinement"]
    assert [(e.done, e.total, e.snapshot) for e in sweeps] == [(1, 3, None), (2, 3, None), (3, 3, None)]
    assert [e.stage for e in events[:3]] == ["inference"] * 3
    rec = events[-1].reconstruction
    np.testing.assert_allclose(rec.object, ref.object, rtol=0, atol=1e-5)  # the same refinement as in-process
    np.testing.assert_allclose(rec.probe, ref.probe, rtol=0, atol=1e-5)
    assert rec.refinement["sweeps"] == 3 and rec.refinement["probe_updated"] is True
    assert rec.refinement["probe_source"].startswith("the host's probe")
    assert plain_refine(RefineSettings(sweeps=2)) == {**plain_refine(RefineSettings()), "sweeps": 2}
    with pytest.raises(TypeError, match="progress is not available through a worker"):
        worker.reconstruct(d, pos, refine=RefineSettings(progress=print))
    with pytest.raises(ValueError, match="refine sweeps must be an integer >= 1"):
        worker.reconstruct(d, pos, refine={"sweeps": 0})


def test_cancel_during_refinement(worker, scan):
    d, pos = scan
    events = worker.run(d, pos, batch_size=48, refine=2000)  # far more sweeps than the cancel lets run
    for e in events:
        if e.stage == "refinement":
            worker.cancel()  # from the host, while the sweeps run
            break
    with pytest.raises(pr.RefinementCancelled, match="cancelled by the host"):
        for _ in events:
            pass
    assert worker.reconstruct(d, pos, batch_size=48).refinement is None  # the worker serves the next call
