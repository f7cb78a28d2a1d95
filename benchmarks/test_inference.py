"""diffraction_to_obj throughput and latency, every execution path on the same weights and the same input.

Group ``N{N}_g{gridsize}_b{batch}``; the paths of one group run back to back
(pytest-benchmark cannot interleave them), so compare paths within a group of
one run. One call = one batch: photon-unit float32 [batch, C, N, N] in, the
model's output out (complex tensor for the torch paths, the two real maps for
ONNX Runtime, copied back to the host for CUDA paths).
"""

from __future__ import annotations

import copy

import pytest

from ._common import (
    BATCHES,
    CUDA_EP,
    GPU_PATHS,
    PATHS,
    SIZES,
    TRT_EP,
    common_info,
    gpu_name,
    group_name,
    latency_info,
    runtime_on_gpu,
    timed_pedantic,
    torch_cuda_available,
)

CASES = [
    pytest.param(N, g, b, path, id=f"{group_name(N, g, b)}-{path}",
                 marks=[pytest.mark.gpu] if path in GPU_PATHS else [])
    for (N, g) in SIZES for b in BATCHES for path in PATHS
]


def make_runner(bb, path: str, x):
    """(callable, info) for one path; the callable runs one batch."""
    import torch

    xt = torch.from_numpy(x)
    info = {"device": "cpu", "provider": "torch", "precision": "fp32"}
    if path == "eager":
        model = bb.eager

        def fn():
            with torch.inference_mode():
                return model(xt)

        info["provider"] = "torch eager (NCHW)"
    elif path == "eager_channels_last":
        model = bb._memo("eager_cl", lambda: copy.deepcopy(bb.eager).to(memory_format=torch.channels_last))

        def fn():
            with torch.inference_mode():
                return model(xt.to(memory_format=torch.channels_last))

        info["provider"] = "torch eager (channels_last)"
    elif path == "torchscript":
        module = bb.torchscript()

        def fn():
            with torch.inference_mode():
                return module(xt)

        info["provider"] = "torch.jit (bundle bytes)"
    elif path == "ort_cpu":
        rt = bb.runtime(backend="onnx", device="cpu")
        run = rt.run_graph

        def fn():
            return run(x)

        info["provider"] = rt.providers[0]
        info["ort_intra_op_threads"] = rt._backend.session.get_session_options().intra_op_num_threads
    elif path == "eager_cuda":
        if not torch_cuda_available():
            pytest.skip("torch sees no CUDA device (CPU-only torch build or no GPU)")
        model = bb._memo("eager_cuda", lambda: copy.deepcopy(bb.eager).cuda())

        def fn():
            with torch.inference_mode():
                return model(xt.cuda()).cpu()  # host→device, forward, device→host (synchronises)

        info.update(device="cuda", provider=f"torch eager CUDA ({torch.cuda.get_device_name(0)})",
                    precision="fp32" + ("/tf32-conv" if torch.backends.cudnn.allow_tf32 else ""),
                    cudnn_benchmark=bool(torch.backends.cudnn.benchmark))
    elif path == "ort_cuda":
        rt = runtime_on_gpu(bb, CUDA_EP)
        run = rt.run_graph

        def fn():
            return run(x)  # IOBinding: one copy in, one copy out per output

        info.update(device="cuda", provider=rt.providers[0])
    elif path == "ort_tensorrt_fp16":
        rt = runtime_on_gpu(bb, TRT_EP, tensorrt=True, precision="fp16")
        run = rt.run_graph
        # TensorRT builds an engine per input-shape range and rebuilds when a shape falls outside it: one
        # untimed call at the largest and one at the smallest batch make a single [min, max] profile, so the
        # cases below do not each pay (or time) an engine rebuild.
        bb._memo("trt_profile", lambda: [run(bb.input(b)) for b in (max(BATCHES), min(BATCHES))] and True)

        def fn():
            return run(x)

        info.update(device="cuda", provider=rt.providers[0], precision="fp16")
    else:  # pragma: no cover
        raise ValueError(path)
    return fn, info


@pytest.mark.parametrize("N,gridsize,batch,path", CASES)
def test_diffraction_to_obj(benchmark, bench_bundles, N, gridsize, batch, path):
    bb = bench_bundles(N, gridsize)
    x = bb.input(batch)
    run, info = make_runner(bb, path, x)
    last = []

    def fn():
        last[:] = [run()]

    benchmark.group = group_name(N, gridsize, batch)
    data = timed_pedantic(benchmark, fn)
    out = last[0]  # functional check (the only check when benchmarks are disabled): output shape
    shape = tuple(out[0].shape) if isinstance(out, (tuple, list)) else tuple(out.shape)
    assert shape == x.shape, (path, shape, x.shape)
    lat = latency_info(data, batch)
    if lat:
        lat["frames_per_s"] = lat["patterns_per_s"] * bb.channels
    if info["device"] == "cuda":
        info["gpu"] = gpu_name()
    benchmark.extra_info.update({
        "kind": "inference", "path": path, **info, "batch": batch, "N": N, "gridsize": gridsize,
        "channels": bb.channels, "params": bb.n_params, "flops_per_pattern": bb.flops_per_pattern,
        **lat, **common_info(),
    })
