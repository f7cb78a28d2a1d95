"""Inference backends: ONNX Runtime (CPU, CUDA with IOBinding, TensorRT) and TorchScript.

A backend turns a float32 batch [B, C, N, N] in photon units into the two
real output maps of the model (amplitude/phase or real/imag).

Why providers are checked after the session is made: onnxruntime-gpu lists
CUDA and TensorRT in ``get_available_providers()`` even on a machine without
a GPU or without the CUDA libraries, and a session asked for CUDA then
silently runs on the CPU. ``session.get_providers()`` tells the truth.
"""

from __future__ import annotations

import importlib
import logging
import threading
import warnings
from types import ModuleType
from typing import Any, Optional, Sequence

import numpy as np

log = logging.getLogger("ptycho_runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "fp16")
ORT_MISSING = ("ptycho-runtime needs ONNX Runtime, and neither onnxruntime nor onnxruntime-gpu is installed. "
               "Install exactly one: pip install 'ptycho-runtime[cpu]' (onnxruntime) or "
               "pip install 'ptycho-runtime[gpu]' (onnxruntime-gpu, for CUDA).")

_fallback_warned = False
_fallback_lock = threading.Lock()
_QUIET = ((r".*(TorchScript|torch\.jit)", DeprecationWarning),
          (r"Specified provider .* is not in available provider names", UserWarning))


class DeviceUnavailableError(RuntimeError):
    """device='cuda' was requested but no CUDA execution provider could be used."""


def import_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module, from whichever of onnxruntime / onnxruntime-gpu is installed.

    Both distributions provide the same module and must not be installed
    together, so the runtime depends on neither and the extras choose one
    (``[cpu]`` or ``[gpu]``); without either, this raises an ImportError
    that names both.
    """
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ImportError(ORT_MISSING) from exc


def check_device_precision(device: str, precision: str) -> None:
    """The one check of ``device`` and ``precision`` arguments (``Bundle`` and the backends)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (got {device!r})")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")


def quiet_library_warnings() -> None:
    """Install filters for the library warnings the runtime reports better itself; set once at load.

    TorchScript's deprecation notices (torch.jit is deprecated upstream, and
    the bundles still carry it) and onnxruntime's "provider not in available
    provider names" (the runtime checks providers itself and says why). The
    filters are appended (a host's own filters, e.g. warnings as errors, keep
    priority) and appending an identical filter twice is a no-op. Never
    ``warnings.catch_warnings()`` around each call: that context manager swaps
    the process-global filter list and is not thread-safe, and a ``Bundle``
    is used from many threads.
    """
    with _fallback_lock:
        for message, category in _QUIET:
            warnings.filterwarnings("ignore", message=message, category=category, append=True)


def _warn_fallback_once(reason: str) -> None:
    global _fallback_warned
    with _fallback_lock:
        if not _fallback_warned:
            log.warning("ptycho_runtime: no usable CUDA device (%s); running on the CPU.", reason)
            _fallback_warned = True


def _to_fp16_graph(data: bytes) -> bytes:
    """Convert a float32 graph to float16 internals with float32 inputs/outputs (needs the onnx package)."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("precision='fp16' with the CUDA provider converts the graph at load time and needs "
                          "the onnx package: pip install 'ptycho-runtime[gpu]'") from exc
    model = convert_float_to_float16(onnx.load_from_string(data), keep_io_types=True)
    return model.SerializeToString()


class OnnxBackend:
    """An onnxruntime session on the best provider the machine really has.

    ``device``: "auto" (CUDA if it works, else CPU with one logged warning),
    "cuda" (error if CUDA is unusable) or "cpu". ``tensorrt=True`` puts the
    TensorRT provider first (engine built on first run; fp16 with
    ``precision="fp16"``). On CUDA, inputs and outputs go through IOBinding:
    one host→device copy per batch and one device→host copy per output.
    ``cuda_graph_batch=B`` (CUDA provider only) captures a CUDA graph for a fixed
    batch B and replays it; it pays off for small batches where kernel-launch
    overhead dominates (live feedback at batch 1–16).
    """

    name = "onnx"

    def __init__(self, graph: bytes, device: str = "auto", precision: str = "fp32", tensorrt: bool = False,
                 intra_op_threads: Optional[int] = None, cuda_device_id: int = 0,
                 cuda_graph_batch: Optional[int] = None) -> None:
        check_device_precision(device, precision)
        ort = import_onnxruntime()
        quiet_library_warnings()
        self._ort = ort
        available = ort.get_available_providers()
        want_gpu = device in ("auto", "cuda") and CUDA in available
        if device == "cuda" and CUDA not in available:
            raise DeviceUnavailableError(
                f"device='cuda' but this onnxruntime has no CUDAExecutionProvider (providers: {available}). "
                "Install onnxruntime-gpu (pip install 'ptycho-runtime[gpu]') on a machine with CUDA.")
        if precision == "fp16" and not want_gpu:
            raise ValueError("precision='fp16' needs a CUDA device (the CPU provider runs fp16 slower than fp32); "
                             "use precision='fp32' on the CPU.")
        providers: list[Any] = []
        if want_gpu:
            if tensorrt and TENSORRT in available:
                providers.append((TENSORRT, {"device_id": cuda_device_id,
                                             "trt_fp16_enable": precision == "fp16",
                                             "trt_engine_cache_enable": True}))
            elif precision == "fp16":
                graph = _to_fp16_graph(graph)
            cuda_options: dict[str, Any] = {"device_id": cuda_device_id}
            if cuda_graph_batch:
                cuda_options["enable_cuda_graph"] = "1"
            providers.append((CUDA, cuda_options))
        providers.append(CPU)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = int(intra_op_threads)
        try:
            self.session = ort.InferenceSession(graph, sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types (Fail, InvalidGraph, ...)
            from ..format import BundleFormatError

            raise BundleFormatError(f"onnxruntime cannot load the bundle's ONNX graph ({type(exc).__name__}); "
                                    "the graph is damaged or was not written by ptycho-export. Re-export it with "
                                    "ptycho-export --force BUNDLE.") from None
        self.providers = self.session.get_providers()
        self.on_gpu = self.providers[0] in (CUDA, TENSORRT)
        if want_gpu and not self.on_gpu:
            reason = (f"onnxruntime lists {CUDA} but the session runs on {self.providers} "
                      "(no GPU visible, or the CUDA/cuDNN libraries are missing)")
            if device == "cuda":
                raise DeviceUnavailableError(f"device='cuda' requested, but {reason}.")
            _warn_fallback_once(reason)
        self.device = "cuda" if self.on_gpu else "cpu"
        self.precision = precision if self.on_gpu else "fp32"
        self.cuda_device_id = cuda_device_id
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._graph_batch = int(cuda_graph_batch) if (cuda_graph_batch and self.providers[0] == CUDA) else None
        if self._graph_batch:
            self._init_cuda_graph(self._graph_batch)

    def _init_cuda_graph(self, batch: int) -> None:
        """Fixed device buffers bound once: a CUDA graph replays kernels on the same addresses.

        Every call copies its (zero-padded) batch into the same input buffer, so
        calls are serialised with a lock; batches larger than ``batch`` are split.
        """
        ort = self._ort
        shape = [batch] + [int(d) for d in self.session.get_inputs()[0].shape[1:]]
        self._graph_lock = threading.Lock()
        self._graph_in = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", self.cuda_device_id)
        self._graph_out = [ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", self.cuda_device_id)
                           for _ in self.output_names]
        self._graph_binding = self.session.io_binding()
        self._graph_binding.bind_ortvalue_input(self.input_names[0], self._graph_in)
        for name, value in zip(self.output_names, self._graph_out, strict=True):
            self._graph_binding.bind_ortvalue_output(name, value)
        self._graph_pad = np.zeros(shape, np.float32)

    def _run_cuda_graph(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs_a, outs_b = [], []
        B = self._graph_batch
        with self._graph_lock:
            for i in range(0, x.shape[0], B):
                chunk = x[i:i + B]
                self._graph_pad[: chunk.shape[0]] = chunk
                self._graph_pad[chunk.shape[0]:] = 0.0
                self._graph_in.update_inplace(self._graph_pad)
                self.session.run_with_iobinding(self._graph_binding)
                outs_a.append(self._graph_out[0].numpy()[: chunk.shape[0]])
                outs_b.append(self._graph_out[1].numpy()[: chunk.shape[0]])
        return np.concatenate(outs_a), np.concatenate(outs_b)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.on_gpu:
            out = self.session.run(self.output_names, {self.input_names[0]: x})
            return out[0], out[1]
        if self._graph_batch:
            return self._run_cuda_graph(x)
        binding = self.session.io_binding()
        x_dev = self._ort.OrtValue.ortvalue_from_numpy(x, "cuda", self.cuda_device_id)
        binding.bind_ortvalue_input(self.input_names[0], x_dev)
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.cuda_device_id)
        self.session.run_with_iobinding(binding)
        out = binding.copy_outputs_to_cpu()
        return out[0], out[1]


class TorchScriptBackend:
    """The bundle's TorchScript graph via libtorch (needs torch: pip install 'ptycho-runtime[torch]')."""

    name = "torchscript"

    def __init__(self, graph: bytes, device: str = "auto", precision: str = "fp32", amp_phase: bool = True) -> None:
        try:  # optional dependency, imported only when this backend is chosen
            torch = importlib.import_module("torch")
        except ImportError as exc:
            raise ImportError("backend='torchscript' needs torch: pip install 'ptycho-runtime[torch]', "
                              "or use backend='onnx'") from exc
        import io

        check_device_precision(device, precision)
        if precision != "fp32":
            raise ValueError("backend='torchscript' runs in fp32 only; use backend='onnx' for fp16")
        if device == "cuda" and not torch.cuda.is_available():
            raise DeviceUnavailableError("device='cuda' but torch sees no CUDA device")
        use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        self._torch = torch
        self._device = torch.device("cuda" if use_cuda else "cpu")
        quiet_library_warnings()
        try:  # torch.jit.load trusts the archive (see format.check_torchscript_archive, run before this)
            self.module = torch.jit.load(io.BytesIO(graph), map_location=self._device)
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError and others for a bad archive
            from ..format import BundleFormatError

            raise BundleFormatError(f"torch.jit.load cannot load the bundle's TorchScript archive "
                                    f"({type(exc).__name__}); it is damaged or was not written by ptycho-export. "
                                    "Re-export it with ptycho-export --force BUNDLE, or use backend='onnx'.") from None
        self.amp_phase = amp_phase
        self.device = self._device.type
        self.precision = "fp32"
        self.providers = [f"torch-{self.device}"]
        self.on_gpu = use_cuda

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            obj = self.module(torch.from_numpy(x).to(self._device)).cpu()
        # return the real pair the ONNX graph would, so the Bundle treats backends alike
        return obj.real.numpy(), obj.imag.numpy()


def available_providers() -> Sequence[str]:
    """The execution providers the installed onnxruntime offers (not all of them may really run)."""
    return import_onnxruntime().get_available_providers()
