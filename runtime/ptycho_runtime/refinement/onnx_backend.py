"""The onnxruntime backend: the refinement-step graph (``onnx_graph``) run once per batch.

The canvas lives on the host as two float32 arrays; each batch call passes
them in and takes the updated ones back (onnxruntime's ScatterND writes a new
output), so momentum and the record stay in numpy. On CUDA the same graph
runs on onnxruntime-gpu's CUDAExecutionProvider when that provider really
loads (checked with ``session.get_providers()``), else this backend refuses.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .numpy_backend import NumpyBackend

_SESSIONS: dict[tuple[int, bool, bool, str, int], Any] = {}  # built sessions, keyed by what built them


def _session(N: int, refine_probe: bool, canvas_in_graph: bool, device: str, threads: int):
    key = (N, refine_probe, canvas_in_graph, device, threads)
    if key not in _SESSIONS:
        import onnxruntime as ort

        from .onnx_graph import build_step_graph

        model = build_step_graph(N, refine_probe, canvas_in_graph)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # each call is short and the hosts are often busy: idle threads sleep instead of spinning (measured faster
        # on shared cores, docs/fidelity.md)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        want = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("backend='onnx' on device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider); this "
                             f"onnxruntime has {ort.get_available_providers()}: use backend='torch' or device='cpu'")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=want)
        if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
            raise ValueError("onnxruntime's CUDAExecutionProvider did not load (CUDA/cuDNN libraries missing?); "
                             "use backend='torch' or device='cpu'")
        _SESSIONS[key] = sess
    return _SESSIONS[key]


def to_split(z: np.ndarray) -> np.ndarray:
    """Complex [..., H, W] → the graph's row-split float32 [..., H, 2, W]."""
    return np.ascontiguousarray(np.stack([z.real, z.imag], axis=-2), dtype=np.float32)


def from_split(t: np.ndarray) -> np.ndarray:
    """The graph's row-split float32 [..., H, 2, W] → complex64 [..., H, W]."""
    return (t[..., 0, :] + 1j * t[..., 1, :]).astype(np.complex64)


def _factor(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A complex factor c as the graph's (a, b): c·z = a·z + b·swap(z) on row-split arrays."""
    return to_split(c.real + 1j * c.real), to_split(-c.imag + 1j * c.imag)


class OnnxBackend(NumpyBackend):
    """The numpy backend's state and sweep-level momentum, with the canvas row-split; the batch runs in onnxruntime."""

    name = "onnx"

    def __init__(self, obj: np.ndarray, probe: np.ndarray, *, device: str = "cpu", threads: Optional[int] = None,
                 canvas_in_graph: Optional[bool] = None, **kwargs: Any) -> None:
        super().__init__(obj, probe, **kwargs)
        self.device = device
        self.canvas_in_graph = device == "cuda" if canvas_in_graph is None else bool(canvas_in_graph)
        # one intra-op thread on the CPU unless asked: each batch call is a few hundred µs of small operators,
        # and a second thread was measured to slow it down on 2 shared cores (docs/fidelity.md); 0 = onnxruntime's
        if threads is None:
            threads = 1 if device == "cpu" else 0
        self._sess = _session(self.N, self.refine_probe, self.canvas_in_graph, device, threads)
        self.providers = list(self._sess.get_providers())
        self._factors: Optional[tuple[np.ndarray, ...]] = None
        self._split = to_split(self.obj)  # [H, 2, W]: what the graph updates; self.obj is refreshed on demand
        H, _, W = self._split.shape
        o = np.arange(self.N + 1)
        self._window = o[:, None, None] * 2 * W + np.arange(2)[None, :, None] * W + o[None, None, :]

    def get_object(self) -> np.ndarray:
        return from_split(self._split)

    def set_object(self, obj: np.ndarray) -> None:
        super().set_object(obj)
        self._split = to_split(self.obj)

    def multiply_object(self, factor: np.ndarray) -> None:
        self._split = to_split(from_split(self._split) * factor)
        if self._velocity is not None:
            self._velocity = to_split(from_split(self._velocity) * factor)

    def begin_momentum_step(self, momentum: float) -> None:
        self._before = self._split.copy() if momentum else None

    def end_momentum_step(self, momentum: float) -> None:
        if not momentum or self._before is None:
            return
        change = self._split - self._before
        if self._velocity is None:
            self._velocity = change
        else:
            self._velocity *= np.float32(momentum)
            self._velocity += change
        self._split += np.float32(momentum) * self._velocity
        self._before = None

    def _split_windows(self) -> np.ndarray:
        """A writeable [H−N, W−N, N+1, 2, N+1] view of the row-split canvas (see NumpyBackend._windows)."""
        H, _, W = self._split.shape
        side = self.N + 1
        sr, sp, sc = self._split.strides
        return np.lib.stride_tricks.as_strided(self._split, (H - side + 1, W - side + 1, side, 2, side),
                                               (sr, sc, sr, sp, sc))

    def run_batch(self, measured: np.ndarray, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray) -> float:
        W = self._split.shape[2]
        if self._factors is None or self.refine_probe:  # a fixed probe's factors are made once
            self._factors = (*_factor(self.probe), *_factor(self.gain()))
        probe_a, probe_b, gain_a, gain_b = self._factors
        feed = {"weights": np.ascontiguousarray(weights.T.reshape(4, -1, 1, 1, 1)),
                "measured": np.ascontiguousarray(measured[:, :, None, :]),
                "probe_a": probe_a, "probe_b": probe_b, "gain_a": gain_a, "gain_b": gain_b}
        if self.canvas_in_graph:
            feed["canvas"] = self._split.reshape(-1)
            feed["index"] = (rows * 2 * W + cols)[:, None, None, None] + self._window
        else:
            views = self._split_windows()
            feed["windows"] = views[rows, cols]
        if self.refine_probe:
            feed["probe"] = to_split(self.probe)
            feed["probe_alpha"] = np.array(self.probe_alpha, np.float32)
        out = self._sess.run(None, feed)
        if self.canvas_in_graph:
            self._split = out[0].reshape(self._split.shape)
        else:
            views[rows, cols] += out[0]  # no two windows of a batch share a pixel
        if self.refine_probe:
            self.probe = from_split(out[2])
        return float(out[1])

    def accumulate_batch(self, *args: Any) -> float:
        raise ValueError("batching='parallel' runs on the numpy backend only: use backend='numpy'")
