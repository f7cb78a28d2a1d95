"""End-to-end reconstruction of a scan: preprocessing + inference + stitching, runtime vs eager PyTorch.

One scan of ``RECON_POSITIONS`` random (fractional) positions over a
``RECON_OBJECT``² object, 64×64 patterns (random non-negative normalised
amplitudes: the timing does not depend on the values), batch 64, gridsize 1.

Paths (group ``reconstruct_N64_g1_n{n}``):
- ``runtime_cpu`` / ``runtime_cuda``: ``Bundle.reconstruct`` (input checks and
  scaling, batched ONNX Runtime inference, complex combine, StitchCanvas);
- ``stitch``: ``stitch_patches`` of the same number of patches alone;
- ``eager_cpu`` / ``eager_cuda``: ``ptycho_export.training.predict_patches`` +
  ``stitch_patches``, the PyTorch way to do the same.
The stitching share of reconstruct (stitch median / reconstruct median) is
computed by report.py.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest

from ._common import (
    CUDA_EP,
    RECON_BATCH,
    RECON_OBJECT,
    RECON_POSITIONS,
    common_info,
    latency_info,
    runtime_on_gpu,
    timed_pedantic,
    torch_cuda_available,
)

N, GRIDSIZE = 64, 1
PATHS = ("runtime_cpu", "runtime_cuda", "stitch", "eager_cpu", "eager_cuda")
GROUP = f"reconstruct_N{N}_g{GRIDSIZE}_n{RECON_POSITIONS}"


@pytest.fixture(scope="module")
def scan():
    rng = np.random.default_rng(7)
    lo, hi = N / 2 + 2, RECON_OBJECT - N / 2 - 2
    positions = rng.uniform(lo, hi, size=(RECON_POSITIONS, 2))  # (x, y) object pixels, fractional
    diffraction = (rng.random((RECON_POSITIONS, N, N), dtype=np.float32) * np.float32(0.7))
    patches = (rng.random((RECON_POSITIONS, N, N), dtype=np.float32)
               * np.exp(1j * rng.random((RECON_POSITIONS, N, N), dtype=np.float32))).astype(np.complex64)
    return {"positions": positions, "diffraction": diffraction, "patches": patches}


def _eager_fn(bb, device: str, diffraction, positions):
    import torch

    from ptycho_export.training import predict_patches
    from ptycho_runtime import stitch_patches

    model = bb.eager if device == "cpu" else bb._memo("eager_cuda", lambda: copy.deepcopy(bb.eager).cuda())
    dev = torch.device(device)
    x = diffraction[:, None]  # [n, 1, N, N]: predict_patches takes [B, C, N, N]

    def fn(n=None):
        sl = slice(None) if n is None else slice(0, n)
        patches = predict_patches(model, x[sl], bb.intensity_scale, batch_size=RECON_BATCH, device=dev)
        return stitch_patches(patches, positions[sl])

    return fn


@pytest.mark.parametrize("path", [pytest.param(p, marks=[pytest.mark.gpu] if "cuda" in p else []) for p in PATHS])
def test_reconstruct(benchmark, bench_bundles, scan, path):
    from ptycho_runtime import stitch_patches

    bb = bench_bundles(N, GRIDSIZE)
    d, pos = scan["diffraction"], scan["positions"]
    n = d.shape[0]
    info = {"device": "cpu", "provider": "numpy"}
    if path in ("runtime_cpu", "runtime_cuda"):
        if path == "runtime_cuda":
            rt = runtime_on_gpu(bb, CUDA_EP)
        else:
            rt = bb.runtime(backend="onnx", device="cpu")
        info.update(device=rt.device, provider=rt.providers[0])

        def full(k=None):
            sl = slice(None) if k is None else slice(0, k)
            return rt.reconstruct(d[sl], pos[sl], batch_size=RECON_BATCH)
    elif path == "stitch":
        def full(k=None):
            sl = slice(None) if k is None else slice(0, k)
            return stitch_patches(scan["patches"][sl], pos[sl])
    else:
        device = "cuda" if path == "eager_cuda" else "cpu"
        if device == "cuda" and not torch_cuda_available():
            pytest.skip("torch sees no CUDA device (CPU-only torch build or no GPU)")
        full = _eager_fn(bb, device, d, pos)
        info.update(device=device, provider=f"torch eager {device}")

    benchmark.group = GROUP
    estimate = None
    if not benchmark.disabled:
        # warm up on two batches, then size the rounds from that (a full CPU call is tens of seconds)
        k = min(n, 2 * RECON_BATCH)
        full(k)
        t0 = time.perf_counter()
        full(k)
        estimate = (time.perf_counter() - t0) * n / k
    last = []

    def call():
        last[:] = [full()]

    data = timed_pedantic(benchmark, call, estimate_s=estimate, min_rounds=5, slow_rounds=3)
    rec = last[0]  # functional check
    assert rec.object.shape[0] > N and np.isfinite(rec.object).all()
    benchmark.extra_info.update({
        "kind": "stitch" if path == "stitch" else "reconstruct", "path": path, **info, "N": N,
        "gridsize": GRIDSIZE, "n_positions": n, "batch": RECON_BATCH, "object_side": RECON_OBJECT,
        "flops_per_pattern": bb.flops_per_pattern, **latency_info(data, n), **common_info(),
    })
