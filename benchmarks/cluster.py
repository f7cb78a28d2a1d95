"""Triton and Dask, as ratios: what serving through Triton and spreading scans over Dask workers cost or gain.

    .venv-cluster/bin/python benchmarks/cluster.py BUNDLE [-o OUT.json] [--frames 1000] [--scans 4] [--smoke]

Run it in the venv ``scripts/test_cluster.sh`` makes (PyTriton, tritonclient,
distributed, no torch). It measures, on the bundle given and on synthetic
scans made from its ``scan.npz`` (frames and positions tiled):

1. Triton round trip per batch: ``TritonBackend.run`` through ``ptycho-runtime
   serve`` on this machine against the in-process ONNX session, batches 1, 16, 64.
2. Throughput through ``serve``: one client reconstructing a scan, and four
   concurrent clients each reconstructing their own, against in-process.
3. ``infer-many`` wall time on a LocalCluster of 1 and of 2 worker processes.

Ratios, not absolute speeds, are the point: on two shared cores every number
moves with the load, but the ratios show the overheads. Prints a markdown
table and writes JSON with ``-o``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import ptycho_runtime as pr
from ptycho_runtime.files.npz import read_npz_arrays, write_npz_arrays


def _ports(k: int) -> list[int]:
    socks = [socket.socket() for _ in range(k)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_server(bundle: Path, home: str, instances: int, threads: int) -> tuple[subprocess.Popen, str]:
    http, grpc, metrics = _ports(3)
    log = open(Path(home) / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ptycho_runtime.cli", "serve", str(bundle), "--host", "127.0.0.1",
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                             "--instances", str(instances), "--threads", str(threads), "--max-queue-delay-us", "500"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTRITON_HOME=home, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 180
    while "\nserving '" not in "\n" + (Path(home) / "serve.log").read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError("serve did not start:\n" + (Path(home) / "serve.log").read_text()[-3000:])
        time.sleep(0.2)
    return proc, f"127.0.0.1:{grpc}"


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synthetic_scan(scan_file: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """``n`` frames tiled from the fixture scan, positions tiled on a grid of scan-sized blocks."""
    s = read_npz_arrays(scan_file)
    rng = np.random.default_rng(seed)
    k = s["diffraction"].shape[0]
    idx = rng.integers(0, k, n)
    block = np.ceil(np.sqrt(n / k))
    span = np.ptp(s["xcoords"]) + 8
    offsets = np.arange(n) // k
    x = s["xcoords"][idx % k] + (offsets % block) * span
    y = s["ycoords"][idx % k] + (offsets // block) * span
    d = s["diffraction"][idx]
    return d, np.stack([x, y], 1), {"diffraction": d, "xcoords": x, "ycoords": y, "probeGuess": s["probeGuess"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("-o", "--output", type=Path)
    ap.add_argument("--frames", type=int, default=1000, help="frames per scan (default 1000)")
    ap.add_argument("--scans", type=int, default=4, help="scans for infer-many (default 4)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.frames, args.scans, args.repeats = 64, 2, 2
    bundle = args.bundle if args.bundle.suffix == ".h5" else args.bundle / "wts.h5"
    scan_file = bundle.parent / "scan.npz"
    threads = 1
    res: dict = {"bundle": str(bundle), "cpus": os.cpu_count(), "frames": args.frames, "scans": args.scans}
    local = pr.load_bundle(bundle, backend="onnx", device="cpu", intra_op_threads=threads)
    C = local.channels
    home = tempfile.mkdtemp(prefix="ptbench")
    proc, url = start_server(bundle, home, instances=2, threads=threads)
    try:
        remote = pr.load_bundle(bundle, backend="triton", url=url)
        rng = np.random.default_rng(0)
        res["round_trip"] = []
        for b in (1, 16, 64):
            x = rng.uniform(0, 30, (b, C, local.N, local.N)).astype(np.float32)
            t_local = timed(lambda x=x: local.run_graph(x), args.repeats)
            t_remote = timed(lambda x=x: remote.run_graph(x), args.repeats)
            res["round_trip"].append({"batch": b, "onnx_ms": 1e3 * t_local, "triton_ms": 1e3 * t_remote,
                                      "ratio": t_remote / t_local})
        d, pos, _ = synthetic_scan(scan_file, args.frames, 1)
        t_in = timed(lambda: local.reconstruct(d, pos), 1)
        t_one = timed(lambda: remote.reconstruct(d, pos), 1)
        clients = [pr.load_bundle(bundle, backend="triton", url=url) for _ in range(4)]

        def four() -> None:
            ts = [threading.Thread(target=c.reconstruct, args=(d, pos)) for c in clients]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        t_four = timed(four, 1)
        n = args.frames
        res["throughput"] = {"in_process_pps": n / t_in, "serve_1_client_pps": n / t_one,
                             "serve_4_clients_pps": 4 * n / t_four,
                             "ratio_1_client": (n / t_one) / (n / t_in),
                             "ratio_4_clients": (4 * n / t_four) / (n / t_in)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)

    from ptycho_runtime.distributed.infer_many import dask_client, infer_many

    with tempfile.TemporaryDirectory() as tmp:
        scans = []
        for k in range(args.scans):
            _, _, arrays = synthetic_scan(scan_file, args.frames, 10 + k)
            scans.append(Path(tmp) / f"scan{k}.npz")
            write_npz_arrays(scans[-1], arrays)
        walls = {}
        for workers in (1, 2):
            with dask_client("local", workers) as client:
                client.wait_for_workers(workers)
                t0 = time.perf_counter()
                results = infer_many(client, bundle, scans, Path(tmp) / f"out{workers}", chunk_frames=256,
                                     intra_op_threads=max(1, (os.cpu_count() or 1) // workers))
                walls[workers] = time.perf_counter() - t0
                assert all(r.ok for r in results), [r.error for r in results]
        res["infer_many"] = {"wall_1_worker_s": walls[1], "wall_2_workers_s": walls[2],
                             "speedup_2_vs_1": walls[1] / walls[2]}
    print(report(res))
    if args.output:
        args.output.write_text(json.dumps(res, indent=1))
    return res


def report(r: dict) -> str:
    lines = [f"bundle {r['bundle']}, {r['cpus']} CPUs, {r['frames']} frames per scan", "",
             "| Triton round trip | in-process ONNX | through serve | ratio |", "|---|---|---|---|"]
    for row in r["round_trip"]:
        lines.append(f"| batch {row['batch']} | {row['onnx_ms']:.2f} ms | {row['triton_ms']:.2f} ms | "
                     f"{row['ratio']:.2f}× |")
    t = r["throughput"]
    lines += ["", "| reconstruct throughput | patterns/s | vs in-process |", "|---|---|---|",
              f"| in-process ONNX | {t['in_process_pps']:.0f} | 1.00× |",
              f"| serve, 1 client | {t['serve_1_client_pps']:.0f} | {t['ratio_1_client']:.2f}× |",
              f"| serve, 4 concurrent clients (total) | {t['serve_4_clients_pps']:.0f} | {t['ratio_4_clients']:.2f}× |",
              "", "| infer-many | wall | speed-up |", "|---|---|---|"]
    m = r["infer_many"]
    lines += [f"| {r['scans']} scans, 1 worker | {m['wall_1_worker_s']:.1f} s | 1.00× |",
              f"| {r['scans']} scans, 2 workers | {m['wall_2_workers_s']:.1f} s | {m['speedup_2_vs_1']:.2f}× |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
