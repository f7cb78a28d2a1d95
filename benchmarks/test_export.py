"""Bundle export: compile TorchScript + ONNX graphs into a bundle and prove parity (``add_graphs_to_bundle``).

Each round exports into a fresh copy of the cached bundle (``force=True``), so
the time covers: reading the bundle, rebuilding the eager models, simulating
the parity inputs, scripting and freezing (TorchScript), ``torch.onnx.export``
(dynamo) for both models, the parity runs and the atomic rewrite. Sizes of the
bundle and of each graph go to extra_info.
"""

from __future__ import annotations

import shutil

import pytest

from ._common import SIZES, SMOKE, common_info


@pytest.mark.parametrize("N,gridsize", [pytest.param(N, g, id=f"N{N}_g{g}") for (N, g) in SIZES])
def test_export(benchmark, bench_bundles, tmp_path, N, gridsize):
    from ptycho_export.export import add_graphs_to_bundle

    bb = bench_bundles(N, gridsize)
    summaries: list[dict] = []
    counter = [0]

    def setup():
        counter[0] += 1
        dst = tmp_path / f"copy{counter[0]}.h5"
        shutil.copyfile(bb.path, dst)
        return (dst,), {}

    def export(path):
        summaries.append(add_graphs_to_bundle(path, force=True))
        return path

    benchmark.group = f"export_N{N}_g{gridsize}"
    # two timed rounds (one when smoke-testing): the first export of a model in a process pays one-off
    # tracing/compilation costs that a second export of the same model does not; both are recorded
    benchmark.pedantic(export, setup=setup, rounds=1 if SMOKE else 2, warmup_rounds=0)
    summary = summaries[-1]
    graphs = summary["graphs"]
    assert all(g["refreshed"] for g in graphs.values()), graphs
    benchmark.extra_info.update({
        "kind": "export", "path": "add_graphs_to_bundle", "N": N, "gridsize": gridsize, "params": bb.n_params,
        "export_s": float(summary["export_time_s"]),
        "export_s_per_round": [float(x["export_time_s"]) for x in summaries],
        "graphs_compile_s": float(sum(g["export_time_s"] or 0.0 for g in graphs.values())),
        "bundle_mib": (tmp_path / f"copy{counter[0]}.h5").stat().st_size / 2**20,
        "graphs": {name: {"mib": g["size_bytes"] / 2**20, "export_s": g["export_time_s"],
                          "max_rel_error": g["max_rel_error"], "method": g["method"], "opset": g["opset"]}
                   for name, g in graphs.items()},
        **common_info(),
    })
