"""Backends: CUDA→CPU fallback with onnxruntime-gpu semantics, device errors, TorchScript vs ONNX."""

from __future__ import annotations

import logging
import sys

import numpy as np
import onnxruntime as ort
import pytest

import ptycho_runtime as pr
from ptycho_runtime.inference import backends

REAL_PROVIDERS = ort.get_available_providers()
HAS_CUDA = backends.CUDA in REAL_PROVIDERS


def _eager_tol(ref) -> float:
    """1e-4 of the output's scale: the graph-vs-eager contract (parity.DEFAULT_TOLERANCE; fixtures are retrained
    on every CI run and a fresh model's ONNX graph may sit anywhere below it, e.g. 2e-5)."""
    return 1e-4 * max(1.0, float(np.abs(np.asarray(ref)).max()))



def _parity(b: pr.Bundle):
    par = b.contents.parity["b3"]
    ref = par["diffraction_to_obj.amplitude"] * np.exp(1j * par["diffraction_to_obj.phase"])
    return par["input.amplitude"], ref


@pytest.fixture
def fake_gpu_ort(monkeypatch):
    """onnxruntime-gpu on a machine without a GPU: CUDA is listed, a session silently runs on the CPU."""
    if HAS_CUDA:
        pytest.skip("this onnxruntime really has CUDA: the fallback cannot be simulated")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [backends.CUDA, *REAL_PROVIDERS])
    monkeypatch.setattr(backends, "_fallback_warned", False)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_auto_falls_back_to_cpu_with_one_warning(fake_gpu_ort, bundle_path, caplog):
    path = bundle_path("n64_g1")
    with caplog.at_level(logging.WARNING, logger="ptycho_runtime"):
        first = pr.load_bundle(path)  # device="auto"
        second = pr.load_bundle(path)
    for b in (first, second):
        assert b.device == "cpu" and b.providers[0] == backends.CPU
        assert not b.on_gpu and b.default_batch_size() == 64
        x, ref = _parity(b)
        np.testing.assert_allclose(b.predict(x), ref, rtol=0, atol=_eager_tol(ref))
    warnings = [r for r in caplog.records if r.name == "ptycho_runtime" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "no usable CUDA device" in warnings[0].getMessage() and "running on the CPU" in warnings[0].getMessage()


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_cuda_requested_but_session_falls_back(fake_gpu_ort, bundle_path):
    with pytest.raises(pr.DeviceUnavailableError, match=r"device='cuda' requested, but onnxruntime lists "
                                                         r"CUDAExecutionProvider but the session runs on"):
        pr.load_bundle(bundle_path("n64_g1"), device="cuda")
    with pytest.raises(pr.DeviceUnavailableError, match="no GPU visible, or the CUDA/cuDNN libraries are missing"):
        backends.OnnxBackend(pr.load_bundle(bundle_path("n64_g1")).contents.graph("onnx", "diffraction_to_obj").data,
                             device="cuda")


@pytest.mark.skipif(HAS_CUDA, reason="onnxruntime has a CUDA provider here")
def test_cuda_without_onnxruntime_gpu(bundle_path):
    with pytest.raises(pr.DeviceUnavailableError, match=r"no CUDAExecutionProvider.*Install onnxruntime-gpu"):
        pr.load_bundle(bundle_path("n64_g1"), device="cuda")
    b = pr.load_bundle(bundle_path("n64_g1"), device="auto")  # no fallback warning path: plain CPU
    assert b.device == "cpu"


def test_cpu_device_and_threads(bundle_path):
    b = pr.load_bundle(bundle_path("n64_g2"), device="cpu", intra_op_threads=1)
    assert b.device == "cpu" and b.providers == [backends.CPU] and b.backend == "onnx"
    x, ref = _parity(b)
    np.testing.assert_allclose(b.predict(x), ref, rtol=0, atol=_eager_tol(ref))
    assert backends.CPU in backends.available_providers()


def test_backend_option_errors(bundle_path):
    graph = pr.load_bundle(bundle_path("n64_g1")).contents.graph("onnx", "diffraction_to_obj").data
    with pytest.raises(ValueError, match="device must be one of"):
        backends.OnnxBackend(graph, device="tpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        backends.OnnxBackend(graph, precision="int8")
    with pytest.raises(ValueError, match=r"precision='fp16' needs a CUDA device"):
        backends.OnnxBackend(graph, device="cpu", precision="fp16")


def test_torchscript_without_torch_says_how_to_install(bundle_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch → ImportError, torch installed or not
    with pytest.raises(ImportError, match=r"backend='torchscript' needs torch: pip install "
                                          r"'ptycho-runtime\[torch\]', or use backend='onnx'"):
        pr.load_bundle(bundle_path("n64_g1"), backend="torchscript")


def test_without_any_onnxruntime_the_error_names_both_extras(bundle_path, monkeypatch, capsys):
    """The runtime depends on neither ORT distribution (installing both breaks both); missing, it says which to add."""
    from ptycho_runtime import cli

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime → ImportError
    with pytest.raises(ImportError, match=r"neither onnxruntime nor onnxruntime-gpu is installed.*"
                                          r"'ptycho-runtime\[cpu\]'.*'ptycho-runtime\[gpu\]'"):
        pr.load_bundle(bundle_path("n64_g1"))
    rc = cli.main(["info", str(bundle_path("n64_g1"))])
    err = capsys.readouterr().err
    assert rc == 2 and "ptycho-runtime[cpu]" in err and "ptycho-runtime[gpu]" in err
    import ptycho_runtime  # noqa: F401 - importing the package itself never needed onnxruntime


def test_inference_sets_no_warning_filters_per_call(fixture_dir, monkeypatch):
    """warnings.catch_warnings() swaps process-global state: not thread-safe, so never used around a call."""
    import warnings

    bundles = [pr.load_bundle(fixture_dir / "n64_g1" / "wts.h5", backend="onnx")]
    try:  # without torch (the runtime-only venv) only the ONNX backend is checked
        import torch  # noqa: F401

        bundles.append(pr.load_bundle(fixture_dir / "n64_g1" / "wts.h5", backend="torchscript", device="cpu"))
    except ImportError:
        pass

    def forbidden(*args, **kwargs):
        raise AssertionError("warnings.catch_warnings() on the inference path")

    monkeypatch.setattr(warnings, "catch_warnings", forbidden)
    x, ref = _parity(bundles[0])
    for b in bundles:
        np.testing.assert_allclose(b.predict(x), ref, rtol=0, atol=_eager_tol(ref))


@pytest.mark.parametrize("name", ["n64_g1", "n64_g2"])
def test_torchscript_backend_equals_onnx(fixture_dir, name):
    pytest.importorskip("torch")
    onnx_b = pr.load_bundle(fixture_dir / name / "wts.h5", backend="onnx")
    ts_b = pr.load_bundle(fixture_dir / name / "wts.h5", backend="torchscript", device="cpu")
    assert ts_b.backend == "torchscript" and ts_b.device == "cpu" and ts_b.providers == ["torch-cpu"]
    x, ref = _parity(onnx_b)
    got_ts = ts_b.predict(x, batch_size=4)
    np.testing.assert_allclose(got_ts, onnx_b.predict(x), rtol=0, atol=_eager_tol(onnx_b.predict(x)))
    np.testing.assert_allclose(got_ts, ref, rtol=0, atol=_eager_tol(ref))
    with pytest.raises(ValueError, match="runs in fp32 only"):
        pr.load_bundle(fixture_dir / name / "wts.h5", backend="torchscript", precision="fp16")
