"""Benchmark fixtures: one cached bundle per model size, shared by every benchmark module.

Run from the repository root:

    pytest benchmarks/ --benchmark-enable --benchmark-json out.json -p no:cacheprovider
    PTYCHO_BENCH_SMOKE=1 pytest benchmarks/ --benchmark-disable -q -p no:cacheprovider   # CI functional check

(``--benchmark-disable`` is in the project's addopts; ``--benchmark-enable`` overrides it.)
"""

from __future__ import annotations

import copy

import pytest

from ._common import (
    BATCHES,
    N_FILTERS_SCALE,
    SIZES,
    SMOKE,
    THREADS,
    BenchBundle,
    cache_dir,
    cached_bundle,
    malloc_env,
    thread_info,
)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (torch CUDA or onnxruntime-gpu); skipped otherwise")
    if THREADS:
        try:
            import torch

            torch.set_num_threads(THREADS)
        except ImportError:
            pass


def pytest_report_header(config):
    return [f"ptycho benchmarks: smoke={SMOKE} sizes={SIZES} batches={BATCHES} n_filters_scale={N_FILTERS_SCALE} "
            f"cache={cache_dir()}",
            f"ptycho benchmarks: malloc env {malloc_env()} threads {thread_info()}"]


@pytest.fixture(scope="session")
def bench_bundles():
    """``bench_bundles(N, gridsize)`` → BenchBundle (cached file + lazily built models/sessions)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    store: dict[tuple[int, int], BenchBundle] = {}
    last: list = [None]

    def get(N: int, gridsize: int) -> BenchBundle:
        if (N, gridsize) not in store:
            store[(N, gridsize)] = BenchBundle(N, gridsize, cached_bundle(N, gridsize))
        bb = store[(N, gridsize)]
        if last[0] is not None and last[0] is not bb:
            last[0].release()
        last[0] = bb
        return bb

    return get


@pytest.fixture(autouse=True)
def _keep_params_cfg():
    """Loading a bundle rewrites the global params.cfg (CONFIG-001); put it back after each benchmark."""
    try:
        from ptycho_export import params
    except ImportError:
        yield
        return
    saved = copy.deepcopy(params.cfg)
    yield
    params.cfg.clear()
    params.cfg.update(saved)



def pytest_sessionfinish(session, exitstatus):
    """Drop benchmarks interrupted before their first timed round (gpu.sh stops overrunning stages with SIGINT):
    pytest-benchmark cannot write its JSON while one has no data, and would lose every finished case."""
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or not getattr(bs, "benchmarks", None):
        return
    bs.benchmarks[:] = [b for b in bs.benchmarks if getattr(getattr(b, "stats", None), "data", None)]
