"""Per-call time of a host's reconstruct: the runtime's warm worker vs ptychodus's spawn-per-call pattern.

ptychodus 1.7 runs every reconstruct call in a freshly spawned process that
loads the model again (``model/processing/subprocess_reconstructor.py``), so
the parent never holds a GPU context. ``ptycho_runtime.hosts.worker.BundleWorker``
keeps one spawned process with the bundle loaded across calls. Same scan for
both (``HOST_PATTERNS`` = 1,000 64×64 patterns, counts, on a fixed object
grid with metre positions and a bad-pixel mask — what the ptychodus
reconstructor sends), batch 64, CPU:

- ``spawn_per_call``: start a worker, load the bundle, reconstruct, stop it —
  ptychodus's pattern, with the runtime's own process and load costs;
- ``warm_worker``: one call to a worker started and loaded before timing.

The ratio (spawn_per_call median / warm_worker median) is in each case's
``extra_info`` once both have run, and in report.py's table.
"""

from __future__ import annotations

import numpy as np
import pytest

from ._common import RECON_BATCH, SMOKE, common_info, latency_info, timed_pedantic

N, GRIDSIZE = 64, 1
HOST_PATTERNS = 100 if SMOKE else 1000
GROUP = f"host_call_N{N}_g{GRIDSIZE}_n{HOST_PATTERNS}"
PATHS = ("spawn_per_call", "warm_worker")
_medians: dict[str, float] = {}


@pytest.fixture(scope="module")
def host_scan():
    import ptycho_runtime as pr

    rng = np.random.default_rng(5)
    pixel = 5e-8
    grid = pr.ObjectGrid((400, 400), pixel, (3e-6, -2e-6))
    pos_px = rng.uniform(N / 2 + 2, 400 - N / 2 - 2, size=(HOST_PATTERNS, 2))
    counts = rng.poisson(30.0, size=(HOST_PATTERNS, N, N)).astype(np.float32)
    bad = np.zeros((N, N), bool)
    bad[10, 10] = bad[30:32, 40] = True
    return {"counts": counts, "positions_m": grid.to_metres(pos_px), "grid": grid, "bad_pixels": bad}


@pytest.mark.parametrize("path", PATHS)
def test_host_call(benchmark, bench_bundles, host_scan, path):
    from ptycho_runtime.hosts.worker import BundleWorker

    bb = bench_bundles(N, GRIDSIZE)
    kwargs = dict(counts=True, units="metres", grid=host_scan["grid"], bad_pixels=host_scan["bad_pixels"],
                  fill=1 + 0j, batch_size=RECON_BATCH)
    args = (host_scan["counts"], host_scan["positions_m"])
    last = []
    warm = None
    if path == "warm_worker":
        warm = BundleWorker(bb.path, device="cpu").start()

        def call():
            last[:] = [warm.reconstruct(*args, **kwargs)]
    else:
        def call():
            with BundleWorker(bb.path, device="cpu") as w:
                last[:] = [w.reconstruct(*args, **kwargs)]

    benchmark.group = GROUP
    try:
        data = timed_pedantic(benchmark, call, min_rounds=3, slow_rounds=3)
    finally:
        if warm is not None:
            warm.close()
    rec = last[0]  # functional check: the host's grid, covered where the scan was
    assert rec.object.shape == (400, 400) and rec.covered.any() and rec.centre_m == pytest.approx((3e-6, -2e-6))
    info = {"kind": "host_call", "path": path, "device": "cpu", "N": N, "gridsize": GRIDSIZE,
            "n_positions": HOST_PATTERNS, "batch": RECON_BATCH, **latency_info(data, HOST_PATTERNS), **common_info()}
    if data is not None:
        _medians[path] = float(np.median(data))
        if len(_medians) == len(PATHS):
            info["spawn_over_warm"] = _medians["spawn_per_call"] / _medians["warm_worker"]
    benchmark.extra_info.update(info)
