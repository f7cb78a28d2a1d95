"""The onnxruntime backend: the refinement-step graph (``onnx_graph``) run once per batch.

The canvas lives on the host as two float32 arrays; each batch call passes
them in and takes the updated ones back (onnxruntime's ScatterND writes a new
output), so momentum and the record stay in numpy. On CUDA the same graph
runs on onnxruntime-gpu's CUDAExecutionProvider when that provider really
loads (checked with ``session.get_providers()``), else this backend refuses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .numpy_backend import NumpyBackend

_SESSIONS: dict[tuple[int, bool, str, int], Any] = {}  # a cache of built sessions, keyed by what built them


def _session(N: int, refine_probe: bool, device: str, threads: int):
    key = (N, refine_probe, device, threads)
    if key not in _SESSIONS:
        import onnxruntime as ort

        from .onnx_graph import build_step_graph

        model = build_step_graph(N, refine_probe)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        want = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("backend='onnx' on device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider); "
                             f"this onnxruntime has {ort.get_available_providers()}: use backend='torch' or device='cpu'")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=want)
        if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
            raise ValueError("onnxruntime's CUDAExecutionProvider did not load (CUDA/cuDNN libraries missing?); "
                             "use backend='torch' or device='cpu'")
        _SESSIONS[key] = sess
    return _SESSIONS[key]


def _pair(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A complex factor c as the graph's (a, b): c·z = a·z + b·swap(z) on (re, im) pairs."""
    a = np.stack([c.real, c.real], axis=-1).astype(np.float32)
    b = np.stack([-c.imag, c.imag], axis=-1).astype(np.float32)
    return a, b


class OnnxBackend(NumpyBackend):
    """Same state and sweep-level momentum as the numpy backend; the batch update runs in onnxruntime."""

    name = "onnx"

    def __init__(self, obj: np.ndarray, probe: np.ndarray, *, device: str = "cpu", threads: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(obj, probe, **kwargs)
        self.device = device
        self._sess = _session(self.N, self.refine_probe, device, threads)
        self.providers = list(self._sess.get_providers())

    def run_batch(self, measured: np.ndarray, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray) -> float:
        shape = self.obj.shape
        probe_a, probe_b = _pair(self.probe)
        gain_a, gain_b = _pair(self.gain())
        feed = {"obj": self.obj.reshape(-1).view(np.float32).reshape(-1, 2),  # complex64 memory, no copy
                "index": self._indices(rows, cols),
                "weights": np.ascontiguousarray(weights.T.reshape(4, -1, 1, 1, 1)),
                "measured_t": np.ascontiguousarray(measured.transpose(0, 2, 1))[..., None],
                "probe_a": probe_a, "probe_b": probe_b, "gain_a": gain_a, "gain_b": gain_b}
        if self.refine_probe:
            feed["probe"] = self.probe.view(np.float32).reshape(self.N, self.N, 2)
            feed["probe_alpha"] = np.array(self.probe_alpha, np.float32)
        out = self._sess.run(None, feed)
        self.obj = np.ascontiguousarray(out[0]).view(np.complex64).reshape(shape)
        if self.refine_probe:
            self.probe = np.ascontiguousarray(out[2]).view(np.complex64).reshape(self.N, self.N)
        return float(out[1])

    def accumulate_batch(self, *args: Any) -> float:
        raise ValueError("batching='parallel' runs on the numpy backend only: use backend='numpy'")
