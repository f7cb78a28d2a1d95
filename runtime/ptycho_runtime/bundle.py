"""``load_bundle`` and ``Bundle``: a verified bundle, a backend, and the inference API.

Normalisation contract (the same as training; see the graph metadata): the
graphs take the diffraction amplitude in photon units. ``predict`` accepts
either the normalised amplitude of the PtychoPINN NPZ contract (multiplied by
the bundle's ``intensity_scale`` here, exactly as training multiplied its
inputs) or, with ``counts=True``, raw detector counts (square root taken:
sqrt(counts) is already in photon units).

Thread safety: a ``Bundle`` holds no per-call state. ``predict`` and
``reconstruct`` may be called from several threads at once (onnxruntime
sessions are thread-safe; each call gets its own buffers and IOBinding).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np

from . import bundle_format as fmt
from .alignment import DEFAULT_PHASE_ITERATIONS, stitch_scan
from .backends import DEVICES, PRECISIONS, OnnxBackend, TorchScriptBackend
from .grouping import group_neighbors
from .inputs import check_positions, prepare_diffraction
from .stitching import Reconstruction, probe_window

BACKENDS = ("auto", "onnx", "torchscript")
INFERENCE_MODEL = "diffraction_to_obj"


@dataclass(frozen=True)
class BundleInfo:
    path: str
    format_version: int
    N: int
    gridsize: int
    intensity_scale: float
    output_mode: str
    backend: str
    device: str
    precision: str
    providers: list[str]
    graphs: list[str]


class Bundle:
    """A loaded model bundle, ready for batched inference and stitching. Make it with ``load_bundle``."""

    def __init__(self, contents: fmt.BundleContents, backend: str = "auto", device: str = "auto",
                 precision: str = "fp32", tensorrt: bool = False, intra_op_threads: Optional[int] = None,
                 cuda_graph_batch: Optional[int] = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)} (got {device!r})")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
        self.contents = contents
        self.path = contents.path
        p = contents.params
        missing = [k for k in ("N", "gridsize", "intensity_scale") if p.get(k) is None]
        if missing:
            raise fmt.BundleFormatError(f"{self.path} has no {', '.join(missing)} in its params; the runtime "
                                        "cannot apply the normalisation contract. Re-save the bundle.")
        self.N = int(p["N"])
        self.gridsize = int(p["gridsize"])
        self.channels = self.gridsize**2
        self.intensity_scale = float(p["intensity_scale"])
        self.output_mode = str(p.get("output_mode", "amp_phase"))
        self.probe = None if p.get("probe") is None else np.asarray(p["probe"])

        if backend == "auto":
            backend = "onnx" if ("onnx", INFERENCE_MODEL) in contents.graphs else "torchscript"
        record = contents.graph(backend, INFERENCE_MODEL)  # clear error if the graph is absent
        if backend == "onnx":
            self._backend = OnnxBackend(record.data, device, precision, tensorrt, intra_op_threads,
                                        cuda_graph_batch=cuda_graph_batch)
            self._pair = self.output_mode
        else:
            self._backend = TorchScriptBackend(record.data, device, precision)
            self._pair = "real_imag"
        self.backend = backend

    # ------------------------------------------------------------------ metadata

    @property
    def params(self) -> dict[str, Any]:
        """The params the model was trained with (a copy: N, gridsize, intensity_scale, probe, …)."""
        return copy.deepcopy(self.contents.params)

    def restore_params(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """CONFIG-001 for hosts that keep a legacy ``params.cfg``-style dict: write every param into it."""
        cfg.update(self.params)
        return cfg

    @property
    def device(self) -> str:
        return self._backend.device

    @property
    def providers(self) -> list[str]:
        return list(self._backend.providers)

    def info(self) -> BundleInfo:
        return BundleInfo(str(self.path), int(self.contents.header["format_version"]), self.N, self.gridsize,
                          self.intensity_scale, self.output_mode, self.backend, self.device,
                          self._backend.precision, self.providers,
                          [f"{k}/{m}" for k, m in sorted(self.contents.graphs)])

    def __repr__(self) -> str:
        return (f"Bundle({str(self.path)!r}, N={self.N}, gridsize={self.gridsize}, backend={self.backend!r}, "
                f"device={self.device!r})")

    # ------------------------------------------------------------------ inference

    def default_batch_size(self) -> int:
        return 256 if self._backend.on_gpu else 64

    def predict(self, diffraction: np.ndarray, offsets: Optional[np.ndarray] = None,
                batch_size: Optional[int] = None, counts: bool = False) -> np.ndarray:
        """Diffraction → complex64 object patches [n, C, N, N].

        ``diffraction``: [n, C, N, N] (or [n, N, N] when C = 1), normalised
        amplitude (NPZ contract) or, with ``counts=True``, detector counts.
        ``offsets`` [n, C, 1, 2] are accepted for PtychoPINN compatibility and
        checked, but the inference graph does not need them.
        """
        x = prepare_diffraction(diffraction, self.N, self.channels, counts, self.intensity_scale)
        if offsets is not None:
            off = np.asarray(offsets)
            if off.shape != (x.shape[0], self.channels, 1, 2):
                raise ValueError(f"offsets must have shape [{x.shape[0]}, {self.channels}, 1, 2] to match the "
                                 f"diffraction (got {list(off.shape)})")
        return self._infer(x, batch_size)

    def _infer(self, x: np.ndarray, batch_size: Optional[int],
               progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
        bs = self.default_batch_size() if batch_size is None else int(batch_size)  # 0 is an error, not 'default'
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        out = np.empty(x.shape, np.complex64)
        for i in range(0, x.shape[0], bs):
            a, b = self._backend.run(np.ascontiguousarray(x[i:i + bs]))
            _combine_into(out[i:i + bs], a, b, self._pair)
            if progress is not None:
                progress(min(bs, x.shape[0] - i))
        return out

    def stitch_window(self, window: Union[str, np.ndarray, None] = "probe") -> Optional[np.ndarray]:
        """The stitching weights: ``"probe"`` → ``probe_window`` of the bundle's probe (None without one)."""
        if isinstance(window, str):
            if window != "probe":
                raise ValueError(f"window must be 'probe', an [N, N] array or None (got {window!r})")
            return None if self.probe is None else probe_window(self.probe)
        return window

    def reconstruct(self, diffraction: np.ndarray, positions: np.ndarray, counts: bool = False,
                    batch_size: Optional[int] = None, object_shape: Optional[tuple[int, int]] = None,
                    crop: Optional[int] = None, window: Union[str, np.ndarray, None] = "probe",
                    align_phase: int = DEFAULT_PHASE_ITERATIONS,
                    progress: Optional[Callable[[int], None]] = None) -> Reconstruction:
        """Predict and stitch a scan into the full object.

        ``positions`` (x, y) in object pixels, frame centre at pixel (N−1)/2
        (see ``positions_from_metres``, ``geometry.to_default_centre``):
        [n, 2] for n frames [n, N, N] — with gridsize > 1 the frames are grouped
        with their nearest neighbours exactly as in training — or, for
        pre-grouped input [n, C, N, N], [n, C, 2]. The canvas is sized to the
        scan, or is ``object_shape`` with origin (0, 0).

        Weighting: ``window`` — "probe" (default: |probe|², which beats a
        crop because it trusts each patch where it was lit), an [N, N] array,
        or None for the ``crop`` (default N/2) central square; an explicit
        ``crop`` wins. ``align_phase`` passes of phase alignment
        (``alignment.align_patch_phases``) put overlapping patches on one
        phase first (0: off). ``progress(k)`` is called after each batch of k
        groups.
        """
        x, pos = self._grouped(diffraction, positions, counts)
        patches = self._infer(x, batch_size, progress)
        w = None if crop is not None else self.stitch_window(window)
        return stitch_scan(patches, pos, window=w, crop=crop, align_phase=align_phase, object_shape=object_shape)

    def _grouped(self, diffraction: np.ndarray, positions: np.ndarray, counts: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
        d = np.asarray(diffraction)
        pos = np.asarray(positions)
        if d.ndim == 3 and self.channels > 1:
            # flat frames: group them with their neighbours, as make_groups does in training
            pos = check_positions(pos, d.shape[0], 1)[:, 0]  # [n, 2]
            idx = group_neighbors(pos[:, 0], pos[:, 1], self.gridsize)
            x = prepare_diffraction(d, self.N, 1, counts, self.intensity_scale)[:, 0]
            return x[idx], pos[idx]
        x = prepare_diffraction(d, self.N, self.channels, counts, self.intensity_scale)
        return x, check_positions(pos, x.shape[0], self.channels)

    def stream(self, **kwargs: Any):
        """A StreamingReconstructor on this bundle (see ptycho_runtime.streaming)."""
        from .streaming import StreamingReconstructor

        return StreamingReconstructor(self, **kwargs)


def _combine_into(out: np.ndarray, a: np.ndarray, b: np.ndarray, pair: str) -> None:
    """Fill complex64 ``out`` from the two real maps, without complex128 temporaries."""
    if pair == "amp_phase":
        out.real = a * np.cos(b)
        out.imag = a * np.sin(b)
    else:
        out.real = a
        out.imag = b


def load_bundle(path: str | os.PathLike, backend: str = "auto", device: str = "auto", precision: str = "fp32",
                tensorrt: bool = False, intra_op_threads: Optional[int] = None,
                cuda_graph_batch: Optional[int] = None) -> Bundle:
    """Open a bundle (file, or folder with ``wts.h5``), verify format and checksums, start a backend.

    ``backend``: "auto" (ONNX if the bundle has it, else TorchScript), "onnx"
    or "torchscript" (needs torch). ``device``: "auto" | "cpu" | "cuda";
    ``precision``: "fp32" | "fp16" (CUDA only). Checksums are verified before
    any graph bytes reach onnxruntime or torch. GPU options: ``tensorrt=True``
    (TensorRT provider first), ``cuda_graph_batch=B`` (CUDA graph for a fixed batch).
    """
    return Bundle(fmt.read_bundle(path), backend, device, precision, tensorrt, intra_op_threads, cuda_graph_batch)
