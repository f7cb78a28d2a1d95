"""``ptycho-runtime infer-many`` on a real Dask cluster: a LocalCluster of 2 worker processes.

Needs the ``[dask]`` extra (``distributed``); skipped elsewhere. CI runs it
in scripts/test_cluster.sh.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

distributed = pytest.importorskip("distributed", reason="the [dask] extra (distributed) is not installed")

import ptycho_runtime as pr  # noqa: E402
from ptycho_runtime import cli  # noqa: E402
from ptycho_runtime.cli import cluster as cli_cluster  # noqa: E402
from ptycho_runtime.distributed import infer_many as im  # noqa: E402
from ptycho_runtime.files.npz import read_npz_arrays, write_npz_arrays  # noqa: E402
from ptycho_runtime.inference.scan_refinement import DEFAULT_MAX_SWEEPS  # noqa: E402
from ptycho_runtime.refinement import DEFAULT_SWEEPS  # noqa: E402

TOL = 1e-6
# what infer writes that legitimately differs between two runs (timings, the scan's path)
VOLATILE_ATTRS = {"elapsed_s", "patterns_per_second", "scan_path"}


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  host="127.0.0.1") as c, distributed.Client(c) as client:
        client.wait_for_workers(2, timeout=120)
        yield c.scheduler_address, client


@pytest.fixture
def scans(bundle_path, tmp_path):
    """Per fixture bundle: its scan, and a second, different scan (shifted positions, other frames)."""

    def get(name: str) -> tuple[Path, list[Path]]:
        path = bundle_path(name)
        first = path.parent / "scan.npz"
        arrays = dict(np.load(first))
        arrays["xcoords"] = arrays["xcoords"] + 2.5
        arrays["diffraction"] = arrays["diffraction"][::-1].copy()
        second = tmp_path / f"{name}_b" / "second.npz"
        second.parent.mkdir()
        write_npz_arrays(second, arrays)
        return path, [first, second]

    return get


NETWORK_ONLY = ["--refine", "0"]  # infer and infer-many both refine by default; the exact comparisons are without


def _infer_single(bundle: Path, scan: Path, out: Path, *extra: str) -> Path:
    assert cli.main(["infer", str(bundle), str(scan), "-o", str(out), *extra]) == 0
    return out


def _assert_like_infer(got: Path, ref: Path) -> None:
    """Same datasets and attributes as single-machine infer; the object within 1e-6."""
    with h5py.File(got, "r") as f, h5py.File(ref, "r") as g:
        assert sorted(f) == sorted(g)
        assert set(f.attrs) == set(g.attrs)
        for key in set(f.attrs) - VOLATILE_ATTRS:
            assert f.attrs[key] == g.attrs[key], key
        for key in g:
            if isinstance(g[key], h5py.Group):
                assert sorted(f[key]) == sorted(g[key])
                continue
            assert f[key].dtype == g[key].dtype and f[key].shape == g[key].shape, key
        np.testing.assert_allclose(f["object"][()], g["object"][()], rtol=0, atol=TOL)
        np.testing.assert_allclose(f["weight"][()], g["weight"][()], rtol=0, atol=1e-9)
        for key in ("amplitude", "phase"):
            np.testing.assert_allclose(f[key][()], g[key][()], rtol=0, atol=TOL)
        for key in ("x_coords", "y_coords", "positions", "probe"):
            np.testing.assert_array_equal(f[key][()], g[key][()])
        assert f.attrs["patterns_per_second"] > 0


@pytest.mark.parametrize("name", ["n64_g1", "n64_g2"])
def test_infer_many_equals_single_process_infer(cluster, scans, tmp_path, capsys, name):
    address, _ = cluster
    bundle, scan_files = scans(name)
    out = tmp_path / "many"
    rc = cli.main(["infer-many", str(bundle), *map(str, scan_files), "-o", str(out), "--scheduler", address,
                   "--chunk-frames", "3", "--no-refine"])  # 16 chunks per scan: partials go through a merge tree
    err = capsys.readouterr().err
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["scan.h5", "second.h5"]  # no temp files
    assert f"infer-many: 2 of 2 scans written to {out}" in err
    for scan in scan_files:
        ref = _infer_single(bundle, scan, tmp_path / f"single_{scan.stem}.h5", *NETWORK_ONLY)
        _assert_like_infer(out / f"{scan.stem}.h5", ref)


def test_infer_many_refines_each_scan_by_default_as_infer_does(cluster, scans, tmp_path, capsys):
    """Default: each scan refined with its own probeGuess, as infer refines it (sweeps, extension and object)."""
    address, _ = cluster
    bundle, scan_files = scans("n64_g1")
    out = tmp_path / "many"
    rc = cli.main(["infer-many", str(bundle), *map(str, scan_files), "-o", str(out), "--scheduler", address,
                   "--chunk-frames", "5"])
    err = capsys.readouterr().err
    assert rc == 0, err
    # the default sweeps, or more where the probe was refined and the fit stayed far above the noise (the extension)
    sweeps = [int(n) for n in re.findall(r"refined \((\d+) sweeps\)", err)]
    assert len(sweeps) == 2 and all(DEFAULT_SWEEPS <= n <= DEFAULT_MAX_SWEEPS for n in sweeps), err
    assert max(sweeps) > DEFAULT_SWEEPS  # one fixture scan's refined probe fits far above its noise: it swept on
    for scan in scan_files:
        ref = _infer_single(bundle, scan, tmp_path / f"single_{scan.stem}.h5")
        with h5py.File(out / f"{scan.stem}.h5", "r") as f, h5py.File(ref, "r") as g:
            assert sorted(f) == sorted(g)
            assert json.loads(f.attrs["refinement_json"])["sweeps"] == json.loads(g.attrs["refinement_json"])["sweeps"]
            np.testing.assert_allclose(f["object"][()], g["object"][()], rtol=0, atol=1e-4)
            np.testing.assert_allclose(f["probe"][()], g["probe"][()], rtol=0, atol=1e-5)
        with h5py.File(out / f"{scan.stem}.h5", "r") as f:
            plain = _infer_single(bundle, scan, tmp_path / f"plain_{scan.stem}.h5", *NETWORK_ONLY)
            with h5py.File(plain, "r") as g:
                assert np.abs(f["object"][()] - g["object"][()]).max() > 1e-3  # refinement did change it


def test_refine_max_sweeps_bounds_each_scan_as_infer_does(cluster, scans, tmp_path, capsys):
    """--refine-max-sweeps 0: every scan stops at its requested sweeps, probe refined or not; -1 is refused."""
    address, _ = cluster
    bundle, scan_files = scans("n64_g1")
    out = tmp_path / "bounded"
    rc = cli.main(["infer-many", str(bundle), *map(str, scan_files), "-o", str(out), "--scheduler", address,
                   "--refine", "5", "--refine-max-sweeps", "0"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("refined (5 sweeps)") == 2, err
    for scan in scan_files:
        with h5py.File(out / f"{scan.stem}.h5", "r") as f:
            record = json.loads(f.attrs["refinement_json"])
        assert record["sweeps"] == 5 == record["sweeps_requested"] and record["max_sweeps"] == 0
    assert cli.main(["infer-many", str(bundle), str(scan_files[0]), "-o", str(out), "--scheduler", address,
                     "--refine-max-sweeps", "-1"]) == 2
    assert "--refine-max-sweeps must be >= 0" in capsys.readouterr().err


def test_local_scheduler_starts_its_own_cluster(scans, tmp_path, capsys):
    bundle, scan_files = scans("n64_g1")
    out = tmp_path / "many"
    assert cli.main(["infer-many", str(bundle), str(scan_files[0]), "-o", str(out), "--workers", "2",
                     "--no-refine"]) == 0, capsys.readouterr().err
    _assert_like_infer(out / "scan.h5", _infer_single(bundle, scan_files[0], tmp_path / "single.h5", *NETWORK_ONLY))


def test_a_bad_scan_fails_alone(cluster, scans, bundle_path, tmp_path, capsys):
    address, _ = cluster
    bundle, scan_files = scans("n64_g1")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    wrong_n = tmp_path / "wrong_n.npz"  # a valid scan of 32×32 frames for a 64×64 model
    arrays = read_npz_arrays(scan_files[0])
    write_npz_arrays(wrong_n, {"diffraction": arrays["diffraction"][:, :32, :32], "xcoords": arrays["xcoords"],
                               "ycoords": arrays["ycoords"], "probeGuess": arrays["probeGuess"][:32, :32]})
    missing = tmp_path / "missing.npz"
    out = tmp_path / "many"
    rc = cli.main(["infer-many", str(bundle), str(garbage), str(scan_files[0]), str(wrong_n), str(missing),
                   "-o", str(out), "--scheduler", address, "--no-refine"])
    err = capsys.readouterr().err
    assert rc == cli_cluster.EXIT_SCANS_FAILED == 5, err
    assert "infer-many: 1 of 4 scans written" in err and "3 failed" in err
    assert "garbage.npz: FAILED: ValueError:" in err
    assert ("wrong_n.npz: FAILED: ValueError: diffraction must have shape [n, 1, 64, 64] or [n, 64, 64], got "
            "[48, 1, 32, 32]") in err
    assert f"missing.npz: FAILED: FileNotFoundError: no scan file at {missing}" in err
    assert sorted(p.name for p in out.iterdir()) == ["scan.h5"]
    _assert_like_infer(out / "scan.h5", _infer_single(bundle, scan_files[0], tmp_path / "single.h5", *NETWORK_ONLY))


class KillWorkerOnce(distributed.WorkerPlugin):
    """SIGKILLs the worker process the first time any worker starts a chunk task (a marker file says 'done')."""

    name = "test-kill-worker-once"

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and "reconstruct_chunk" in str(key):
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_worker_is_retried_with_an_identical_result(cluster, scans, tmp_path):
    import cloudpickle

    _, client = cluster
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    bundle, scan_files = scans("n64_g2")
    marker = tmp_path / "killed"
    pids_before = set(client.run(os.getpid).values())
    client.register_plugin(KillWorkerOnce(str(marker)))
    try:
        results = im.infer_many(client, bundle, scan_files, tmp_path / "many", chunk_frames=4, refine=None)
    finally:
        client.unregister_worker_plugin(KillWorkerOnce.name)
    assert marker.exists()
    killed = int(marker.read_text())
    assert killed in pids_before  # a real worker process died mid-run ...
    client.wait_for_workers(2, timeout=120)
    assert killed not in set(client.run(os.getpid).values())  # ... and the nanny replaced it
    assert [r.ok for r in results] == [True, True], [r.error for r in results]
    for scan in scan_files:  # nothing lost: both scans complete and equal to single-process infer
        _assert_like_infer(tmp_path / "many" / f"{scan.stem}.h5",
                           _infer_single(bundle, scan, tmp_path / f"single_{scan.stem}.h5", *NETWORK_ONLY))


def test_unreachable_scheduler_exits_3(scans, tmp_path, capsys, monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setattr(im, "CONNECT_TIMEOUT_S", 1.0)
    bundle, scan_files = scans("n64_g1")
    rc = cli.main(["infer-many", str(bundle), str(scan_files[0]), "-o", str(tmp_path / "o"),
                   "--scheduler", f"tcp://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port} within 1 s" in err
    assert not (tmp_path / "o").exists()


def test_usage_errors_exit_2(cluster, scans, tmp_path, capsys):
    address, _ = cluster
    bundle, scan_files = scans("n64_g1")
    twin = tmp_path / "twin" / "scan.npz"
    twin.parent.mkdir()
    twin.write_bytes(scan_files[0].read_bytes())
    assert cli.main(["infer-many", str(bundle), str(scan_files[0]), str(twin), "-o", str(tmp_path / "o"),
                     "--scheduler", address]) == 2
    assert "would both be written to scan.h5" in capsys.readouterr().err
    assert cli.main(["infer-many", str(bundle), str(scan_files[0]), "-o", str(tmp_path / "o"),
                     "--scheduler", "localhost:8786"]) == 2
    assert "--scheduler must be 'local' or a scheduler address" in capsys.readouterr().err
    assert cli.main(["infer-many", str(bundle), str(scan_files[0]), "-o", str(tmp_path / "o"),
                     "--scheduler", address, "--chunk-frames", "0"]) == 2
    assert "chunk_frames must be >= 1" in capsys.readouterr().err


def test_a_cluster_without_workers_fails_the_scans_instead_of_waiting_for_ever(scans, tmp_path):
    bundle, scan_files = scans("n64_g1")
    seen = []
    with distributed.LocalCluster(n_workers=0, processes=True, dashboard_address=":0", host="127.0.0.1") as c, \
            distributed.Client(c) as client:
        with pytest.raises(pr.ClusterError, match="has had no workers for 2 s; start workers"):
            im.infer_many(client, bundle, scan_files, tmp_path / "o", no_workers_timeout_s=2, on_result=seen.append)
    assert [r.ok for r in seen] == [False, False] and all("no workers" in r.error for r in seen)
    assert not (tmp_path / "o").exists()


def test_worker_plugin_refuses_a_different_file(bundle_path):
    path = bundle_path("n64_g1")
    plugin = im.BundleWorkerPlugin(str(path), "0" * 64)
    with pytest.raises(pr.ClusterError, match="sees a different file at .* give every worker the same bundle"):
        plugin.setup()
    plugin = im.BundleWorkerPlugin(str(path.parent / "absent.h5"), "0" * 64)
    with pytest.raises(pr.ClusterError, match="cannot read the bundle .* every worker sees under the same path"):
        plugin.setup()
    ok = im.BundleWorkerPlugin(str(path), im.file_sha256(path), device="cpu")
    ok.setup()
    assert ok.bundle.N == 64 and ok.name.startswith(im.PLUGIN_PREFIX)
    assert json.dumps(ok.bundle.providers) == '["CPUExecutionProvider"]'
