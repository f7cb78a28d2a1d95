"""Work per pattern and this machine's fp32 peak, for the share-of-peak figure in report.py.

- ``test_flops``: FLOPs of one ``diffraction_to_obj`` forward per pattern (batch item),
  counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add;
  convolutions and matmuls only: activations, pooling and up-sampling are not counted).
- ``test_cpu_matmul_peak``: ``torch.mm`` of two 2048×2048 fp32 matrices with torch's
  default threads; extra_info ``gflops`` = 2·2048³ / best round (the practical peak),
  ``gflops_median`` from the median round.
- ``test_cpu_conv_peak``: one 3×3 convolution of the model's most common shape (64→64 channels at
  64×64, batch 8; oneDNN via torch), same FLOP convention. On CPUs where MKL's SGEMM does not use the
  full vector width (MKL on AMD), this is the more honest ceiling for a convolutional network.
report.py: share of peak = patterns/s × FLOPs per pattern / peak (for both peaks).
"""

from __future__ import annotations

import numpy as np
import pytest

from ._common import SIZES, SMOKE, common_info, count_flops, timed_pedantic

MM = 1024 if SMOKE else 2048


@pytest.mark.parametrize("N,gridsize", [pytest.param(N, g, id=f"N{N}_g{g}") for (N, g) in SIZES])
def test_flops(benchmark, bench_bundles, N, gridsize):
    bb = bench_bundles(N, gridsize)
    result = {}

    def count():
        result["total"], result["per_op"] = count_flops(bb.eager, N, bb.channels)

    benchmark.group = "flops"
    benchmark.pedantic(count, rounds=1, warmup_rounds=0)
    assert result["total"] > 0
    benchmark.extra_info.update({
        "kind": "flops", "path": "FlopCounterMode", "N": N, "gridsize": gridsize, "channels": bb.channels,
        "params": bb.n_params, "flops_per_pattern": result["total"], "flops_by_op": result["per_op"],
        **common_info(),
    })


def test_cpu_matmul_peak(benchmark):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(MM, MM, generator=gen)
    b = torch.randn(MM, MM, generator=gen)
    c = torch.empty(MM, MM)

    def mm():
        torch.mm(a, b, out=c)

    benchmark.group = "cpu_peak"
    data = timed_pedantic(benchmark, mm, target_s=1.0, min_rounds=10, max_rounds=50)
    flop = 2.0 * MM**3
    info = {"kind": "peak", "path": f"torch.mm {MM}³ fp32", "device": "cpu", "size": MM, "flop": flop}
    if data is not None:
        info.update(gflops=float(flop / data.min() / 1e9), gflops_median=float(flop / np.median(data) / 1e9),
                    rounds=int(data.size))
    benchmark.extra_info.update({**info, **common_info()})


def test_cpu_conv_peak(benchmark):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    b, c, n = (2, 64, 32) if SMOKE else (8, 64, 64)
    conv = torch.nn.Conv2d(c, c, 3, padding=1).eval()
    x = torch.randn(b, c, n, n, generator=gen)

    def run():
        with torch.inference_mode():
            conv(x)

    benchmark.group = "cpu_peak"
    data = timed_pedantic(benchmark, run, target_s=1.0, min_rounds=10, max_rounds=100)
    flop = 2.0 * b * n * n * c * c * 9
    info = {"kind": "peak_conv", "path": f"conv3x3 {c}->{c} @{n}² b{b} fp32", "device": "cpu", "flop": flop}
    if data is not None:
        info.update(gflops=float(flop / data.min() / 1e9), gflops_median=float(flop / np.median(data) / 1e9),
                    rounds=int(data.size))
    benchmark.extra_info.update({**info, **common_info()})
