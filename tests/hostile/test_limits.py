"""The reader's schema limits agree with what the writer really produces (a limit too tight rejects real bundles)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ptycho_runtime import format as fmt  # noqa: E402


@pytest.mark.parametrize("N,nfs", [(64, 1), (64, 2), (128, 1), (256, 1)])
def test_weight_limit_covers_the_largest_architecture(N, nfs):
    from ptycho_export import params
    from ptycho_export.model import create_torch_model_with_gridsize

    cfg = {**params.cfg, "n_filters_scale": nfs}
    models = create_torch_model_with_gridsize(fmt.MAX_GRIDSIZE, N, cfg)
    limit = nfs**2 * fmt.WEIGHT_BYTES_PER_SCALE2[N]
    for name, model in models.items():
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        assert size <= limit, (name, size, limit)
        assert size >= 0.8 * limit / nfs**2 * (1 if nfs == 1 else 0.9)  # the bound stays near the real size
        assert len(model.state_dict()) <= fmt.MAX_TENSORS_PER_MODEL


@pytest.mark.parametrize("N,gridsize,mode,activation", [(64, 2, "real_imag", "softplus"), (128, 1, "amp_phase",
                                                                                            "sigmoid")])
def test_onnx_allow_list_covers_the_exporter(N, gridsize, mode, activation):
    """Graphs exported for gridsize 2, real_imag, softplus (the widest op set), and for N=128, gridsize 1 (the
    largest tensors per pattern: format.graph_sizes), pass the runtime's checks."""
    from ptycho_export import params
    from ptycho_export.export import compile_graphs, eager_outputs, parity_inputs
    from ptycho_export.model import create_torch_model_with_gridsize

    p = {**params.cfg, "N": N, "gridsize": gridsize, "n_filters_scale": 1, "output_mode": mode,
         "amp_activation": activation}
    models = create_torch_model_with_gridsize(gridsize, N, p)
    for m in models.values():
        m.eval()
    p["intensity_scale"] = float(models["diffraction_to_obj"].scaler.scale().detach())
    cases = parity_inputs(p)
    eager_outputs(models, p, cases)
    graphs = compile_graphs(models, p, cases)
    assert {(g.kind, g.model) for g in graphs} == {(k, m) for k in fmt.GRAPH_KINDS for m in fmt.MODEL_NAMES}
    for g in graphs:
        if g.kind == "onnx":
            fmt.check_onnx_graph(g.data, (g.kind, g.model), p)
        else:
            fmt.check_torchscript_archive(g.data, g.model)
        fmt.check_graph_metadata(g.metadata, g.kind, g.model, p, g.data, "test", f"/graphs/{g.kind}/{g.model}")
