"""The reader's schema limits agree with what the writer really produces (a limit too tight rejects real bundles)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ptycho_runtime import bundle_format as fmt  # noqa: E402


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


def test_onnx_allow_list_covers_every_mode(make_bundle):
    """A real real_imag, gridsize-2 bundle passes the ONNX check (the allow-list is not too tight)."""
    from ptycho_runtime import load_bundle

    b = load_bundle(make_bundle(N=64, gridsize=2, output_mode="real_imag"))
    for (kind, model), rec in b.contents.graphs.items():
        if kind == "onnx":
            fmt.check_onnx_graph(rec.data, (kind, model), b.contents.params)
        else:
            fmt.check_torchscript_archive(rec.data, model)
