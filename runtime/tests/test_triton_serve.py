"""``ptycho-runtime serve`` (a real tritonserver via PyTriton) and the ``triton`` client backend, end to end.

Each server is the CLI in a subprocess on loopback ports. Needs the
``[serve]`` extra (PyTriton + tritonclient) in a venv from a Python that
ships libpython (CI: Debian's python3.11, scripts/test_cluster.sh); skipped
elsewhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("pytriton", reason="the [serve] extra (nvidia-pytriton) is not installed")
pytest.importorskip("tritonclient.grpc", reason="the [triton] extra (tritonclient) is not installed")

import ptycho_runtime as pr  # noqa: E402
from ptycho_runtime.files.npz import read_npz_arrays  # noqa: E402
from ptycho_runtime.reconstruction.grouping import group_neighbors  # noqa: E402

START_TIMEOUT_S = 120
TOL = 1e-6


def _free_ports(k: int) -> list[int]:
    socks = []
    for _ in range(k):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    """``ptycho-runtime serve`` in its own process group, so a test can stop, freeze or kill all of it."""

    def __init__(self, bundle: Path, log_path: Path, *extra: str) -> None:
        for _ in range(3):  # free ports are picked, then released: another process may take one meanwhile
            if self._start(bundle, log_path, *extra):
                return
        pytest.fail(f"ptycho-runtime serve found its ports taken 3 times:\n{self.log()[-2000:]}")

    def _start(self, bundle: Path, log_path: Path, *extra: str) -> bool:
        self.http, self.grpc, self.metrics = _free_ports(3)
        self.url = f"127.0.0.1:{self.grpc}"
        self.log_path = log_path
        # PyTriton's workspace (unix sockets, a copy of tritonserver): a killed server leaves it behind, so it goes
        # in a folder of the test's own, with a short path (unix socket paths are limited to 107 bytes)
        self.home = tempfile.mkdtemp(prefix="ptsrv")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTRITON_HOME=self.home)
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ptycho_runtime.cli", "serve", str(bundle), "--host", "127.0.0.1",
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
             "--threads", "1", *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while "\nserving '" not in "\n" + self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                if "cannot listen on" in self.log():
                    return False
                pytest.fail(f"ptycho-runtime serve did not start:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal_group(signal.SIGCONT)
        self.signal_group(signal.SIGKILL)
        self.proc.wait(30)
        deadline = time.monotonic() + 30  # tritonserver and its stubs too (same group, or PDEATHSIG from PyTriton)
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        self._log.close()
        shutil.rmtree(self.home, ignore_errors=True)

    def stop(self) -> int:
        """SIGTERM to the serve process, as a service manager would; its exit status."""
        self.signal_group(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self.kill()


def _scan(path: Path):
    scan = read_npz_arrays(path.parent / "scan.npz")
    return scan["diffraction"], np.stack([scan["xcoords"], scan["ycoords"]], axis=1)


def _assert_same(got: pr.Reconstruction, ref: pr.Reconstruction) -> None:
    np.testing.assert_array_equal(got.x_coords, ref.x_coords)
    np.testing.assert_array_equal(got.y_coords, ref.y_coords)
    np.testing.assert_allclose(got.weight, ref.weight, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.object, ref.object, rtol=0, atol=TOL)


@pytest.fixture(scope="module")
def served(fixture_dir, tmp_path_factory):
    """The gridsize-2 fixture bundle served with 2 instances and a small max batch (so the client splits)."""
    tmp = tmp_path_factory.mktemp("served")
    path = tmp / "wts.h5"
    shutil.copy(fixture_dir / "n64_g2" / "wts.h5", path)
    shutil.copy(fixture_dir / "n64_g2" / "scan.npz", tmp / "scan.npz")
    server = Server(path, tmp / "serve.log", "--instances", "2", "--max-batch-size", "16",
                    "--max-queue-delay-us", "2000")
    yield path, server
    assert server.stop() == 0, server.log()[-3000:]  # SIGTERM: clean shutdown, exit 0
    assert "successfully unloaded 'ptycho'" in server.log()


def test_triton_backend_reconstructs_like_local_onnx(served):
    path, server = served
    diff, pos = _scan(path)
    local = pr.load_bundle(path, backend="onnx", device="cpu")
    remote = pr.load_bundle(path, backend="triton", url=server.url)  # the self-test runs through the server
    info = remote.info()
    assert (info.backend, info.device, info.precision) == ("triton", "cpu", "fp32")
    assert remote.providers == [f"triton:{server.url}/ptycho"]
    assert remote._backend.max_batch_size == 16
    np.testing.assert_allclose(remote.predict(diff[:5, None].repeat(4, 1)), local.predict(diff[:5, None].repeat(4, 1)),
                               rtol=0, atol=TOL)
    for batch_size in (None, 7):  # 64 → four server batches of 16; 7 → uneven batches
        _assert_same(remote.reconstruct(diff, pos, batch_size=batch_size), local.reconstruct(diff, pos))


def test_concurrent_clients_each_get_their_own_scan(served):
    """Four hosts at once (dynamic batching mixes their requests): each gets exactly its own reconstruction."""
    path, server = served
    diff, pos = _scan(path)
    local = pr.load_bundle(path, backend="onnx", device="cpu")
    scans = [(diff * (1.0 + 0.1 * k), pos + 3.0 * k) for k in range(4)]  # four different scans
    refs = [local.reconstruct(d, p) for d, p in scans]
    results: dict[int, object] = {}

    def host(k: int) -> None:
        try:
            b = pr.load_bundle(path, backend="triton", url=server.url)
            results[k] = b.reconstruct(*scans[k], batch_size=4)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results[k] = exc

    threads = [threading.Thread(target=host, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2, 3]
    for k in range(4):
        assert isinstance(results[k], pr.Reconstruction), results[k]
        _assert_same(results[k], refs[k])


def test_streaming_through_triton_equals_reconstruct(served):
    path, server = served
    diff, pos = _scan(path)
    idx = group_neighbors(pos[:, 0], pos[:, 1], 2)
    frames, grouped = diff[idx], pos[idx]  # pre-grouped input, as streaming takes for gridsize 2
    remote = pr.load_bundle(path, backend="triton", url=server.url)
    with remote.stream(scan_positions=grouped, batch_size=5, max_latency_s=0.01) as live:
        for k in range(0, len(frames), 3):
            live.feed(frames[k:k + 3], grouped[k:k + 3])
    _assert_same(live.close(), pr.load_bundle(path, device="cpu").reconstruct(frames, grouped))


def test_connect_refuses_a_server_model_that_is_not_this_bundle(served, bundle_path, tmp_path):
    path, server = served
    with pytest.raises(pr.ServerModelMismatchError, match=r"declares input 'diffraction' as TYPE_FP32 \[4, 64, 64\], "
                                                          r"but this bundle \(N=64, gridsize=1\) needs TYPE_FP32 "
                                                          r"\[1, 64, 64\]"):
        pr.load_bundle(bundle_path("n64_g1"), backend="triton", url=server.url)
    other = tmp_path / "other.h5"  # same graph and params, different file: another export of "the same" model
    shutil.copy(path, other)
    with h5py.File(other, "r+") as f:
        f.attrs["created_utc"] = "2000-01-01T00:00:00Z"
    assert pr.load_bundle(other, device="cpu") is not None  # a valid bundle ...
    with pytest.raises(pr.ServerModelMismatchError, match=r"runs the bundle with sha256 [0-9a-f]{16}…, but this "
                                                          r"bundle's file has sha256 [0-9a-f]{16}…"):
        pr.load_bundle(other, backend="triton", url=server.url)  # ... but not the one the server runs
    with pytest.raises(pr.ServerModelMismatchError, match="has no ready model 'nope'"):
        pr.load_bundle(path, backend="triton", url=server.url, model_name="nope")
    with pytest.raises(ValueError, match="HTTP URL"):
        pr.load_bundle(path, backend="triton", url=f"http://127.0.0.1:{server.http}")
    with pytest.raises(ValueError, match="backend='triton' only"):
        pr.load_bundle(path, url=server.url)


def test_serve_refuses_a_port_in_use_at_once(bundle_path, capsys):
    from ptycho_runtime import cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        rc = cli.main(["serve", str(bundle_path("n64_g1")), "--host", "127.0.0.1", "--grpc-port", str(port)])
    assert rc == 2 and time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port} (--grpc-port)" in err and "choose another port with --grpc-port" in err


def test_no_server_fails_fast_and_clearly(bundle_path):
    (port,) = _free_ports(1)
    t0 = time.monotonic()
    with pytest.raises(pr.ServerUnavailableError, match=rf"Triton server at 127.0.0.1:{port} is unreachable during "
                                                        r"the liveness check \(3 attempts"):
        pr.load_bundle(bundle_path("n64_g1"), backend="triton", url=f"127.0.0.1:{port}", retries=2)
    assert time.monotonic() - t0 < 10  # 2 retries: 0.5 s + 1 s of pauses, not a hang


def test_hung_or_vanished_server_mid_scan_gives_a_clear_error_never_a_partial_object(bundle_path, tmp_path):
    path = bundle_path("n64_g1")
    diff, pos = _scan(path)
    server = Server(path, tmp_path / "serve.log")
    try:
        hasty = pr.load_bundle(path, backend="triton", url=server.url, timeout_s=2, retries=2)
        server.signal_group(signal.SIGSTOP)  # hung: accepts nothing, answers nothing
        t0 = time.monotonic()
        with pytest.raises(pr.ServerUnavailableError, match=r"did not answer inference \(batch 1 of 1\) within 2 s"):
            hasty.reconstruct(diff, pos)
        assert time.monotonic() - t0 < 10
        server.signal_group(signal.SIGCONT)  # it recovers: the same server answers correctly again
        b = pr.load_bundle(path, backend="triton", url=server.url, timeout_s=20, retries=2)
        _assert_same(b.reconstruct(diff, pos), pr.load_bundle(path, device="cpu").reconstruct(diff, pos))

        batches: list[int] = []

        def kill_after_first_batch(k: int) -> None:
            batches.append(k)
            if len(batches) == 1:
                server.kill()  # the whole server, tritonserver included, goes away mid-scan

        t0 = time.monotonic()
        with pytest.raises(pr.ServerUnavailableError, match=r"unreachable during inference|did not answer "
                                                            r"inference") as err:
            b.reconstruct(diff, pos, batch_size=8, progress=kill_after_first_batch)
        assert time.monotonic() - t0 < 30  # bounded: retries with pauses, or one deadline
        assert batches == [8]  # nothing after the kill was reported done, and no object was returned
        assert "no partial result was kept" in str(err.value)
    finally:
        server.kill()
