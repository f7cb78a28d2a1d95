"""The onnxruntime backend: the refinement-step graph (``onnx_graph``) run once per batch.

The canvas lives on the host as one row-split float32 array; each batch call
passes the batch's windows in and adds the graph's update back through a
strided view, so momentum and the record stay in numpy. On the CPU a batch is
split between threads (``threads``, one per core, 2 at most): its frames are
independent and their windows disjoint, and ``InferenceSession.run`` releases
the GIL, so each part runs the graph on its own core (one intra-op thread
each, which scales better than one run on two intra-op threads: measured in
docs/fidelity.md). With probe refinement the parts' probe sums are added
before the host makes the probe step. On CUDA the same graph
runs on onnxruntime-gpu's CUDAExecutionProvider when that provider really
loads (checked with ``session.get_providers()``), else this backend refuses.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..reconstruction.compiled import default_threads
from .numpy_backend import NumpyBackend

_SESSIONS: dict[tuple[int, bool, bool, str, int], Any] = {}  # built sessions, keyed by what built them


def session_options(threads: int):
    """The options every refinement session runs with (``threads`` intra-op threads; 0: onnxruntime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # each call is short and the hosts are often busy: idle threads sleep instead of spinning (measured faster
    # on shared cores, docs/fidelity.md)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def _session(N: int, refine_probe: bool, canvas_in_graph: bool, device: str, threads: int):
    key = (N, refine_probe, canvas_in_graph, device, threads)
    if key not in _SESSIONS:
        import onnxruntime as ort

        from .onnx_graph import build_step_graph

        model = build_step_graph(N, refine_probe, canvas_in_graph)
        opts = session_options(threads)
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
        # threads sharing each batch on the CPU, each running the session on one intra-op thread; on CUDA (or with
        # the canvas in the graph, which rewrites the whole canvas per call) one call per batch, with onnxruntime's
        # default intra-op threads there
        split = device == "cpu" and not self.canvas_in_graph
        self.threads = (default_threads() if threads is None else max(1, int(threads))) if split else 1
        intra_op = 1 if device == "cpu" else 0
        self._sess = _session(self.N, self.refine_probe, self.canvas_in_graph, device, intra_op)
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

    def _run_part(self, feed: dict[str, np.ndarray], views: Optional[np.ndarray], measured: np.ndarray,
                  rows: np.ndarray, cols: np.ndarray, weights: np.ndarray) -> list[np.ndarray]:
        """One part of a batch through the graph; with host windows (``views``, ``_split_windows``) the windows'
        update is added to the canvas here."""
        feed = dict(feed, weights=np.ascontiguousarray(weights.T.reshape(4, -1, 1, 1, 1)),
                    measured=np.ascontiguousarray(measured[:, :, None, :]))
        if self.canvas_in_graph:
            W = self._split.shape[2]
            feed["canvas"] = self._split.reshape(-1)
            feed["index"] = (rows * 2 * W + cols)[:, None, None, None] + self._window
            out = self._sess.run(None, feed)
            self._split = out[0].reshape(self._split.shape)
            return out
        feed["windows"] = views[rows, cols]
        out = self._sess.run(None, feed)
        views[rows, cols] += out[0]  # no two windows of a batch share a pixel
        return out

    def run_batch(self, measured: np.ndarray, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray) -> float:
        if self._factors is None or self.refine_probe:  # a fixed probe's factors are made once
            self._factors = (*_factor(self.probe), *_factor(self.gain()))
        feed = dict(zip(("probe_a", "probe_b", "gain_a", "gain_b"), self._factors, strict=True))
        views = None if self.canvas_in_graph else self._split_windows()  # made once: as_strided costs ≈ 30 µs
        outs = self._in_parts(len(rows), lambda i: self._run_part(feed, views, measured[i], rows[i], cols[i],
                                                                   weights[i]))
        if self.refine_probe:
            self._probe_step(from_split(sum(out[2] for out in outs)), sum(out[3] for out in outs)[:, 0, :])
        return float(sum(float(out[1]) for out in outs))

    def accumulate_batch(self, *args: Any) -> float:
        raise ValueError("batching='parallel' runs on the numpy backend only: use backend='numpy'")
