"""``refine`` and ``Refiner``: the built-in batched refinement engine, its inputs checked once, any backend.

The engine owns what is the same for every backend: the checks of the
inputs, where each frame's window lies, the batches, the sweep loop with its
momentum, progress and cancellation, and the record of what ran. A backend
(numpy, numba, torch, onnxruntime) owns the arrays and the per-batch update.

Positions stay fixed: only the object (and, with ``refine_probe``, the probe)
is refined.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Optional

import numpy as np

from ..reconstruction.geometry import frame_origin
from ..reconstruction.stitching import Reconstruction
from .batching import BATCHINGS, make_batches, window_corners
from .result import CancelFn, ProgressFn, RefinementCancelled, RefineResult, cancel_requested

log = logging.getLogger(__name__)

# measured on the held-out realistic scan (docs/fidelity.md, "Batched refinement" and "The default path"): with
# rPIE's α = 0.3, 20 sweeps from the network's object reach phase SSIM 0.858 and 30 reach 0.959, above pty-chi's
# LSQML run to 200 epochs (0.900) in one second more; ePIE's α = 1 gives 0.736 at 20 and needs about 40 for 0.86.
# The scan path (inference.scan_refinement) also fits the object's slow phase every 4 sweeps
# (refinement.phase_field), which reaches more in 16 sweeps (0.975-0.980) than the sweeps alone in 30 (0.965), so 16
# is the default everywhere; this engine's own run(), without those fits, takes the same number
DEFAULT_SWEEPS = 16
DEFAULT_MOMENTUM = 0.9
# momentum steps per sweep: the sweep's batches (in their random order) are split in this many parts and the
# momentum applied after each. Twice per sweep (mPIE applies it every T positions, not once per pass) lifted the
# 30-sweep phase SSIM on the held-out scan from 0.958 to 0.966 (0.858 → 0.911 at 20) and on pty-chi's scan from
# 0.680 to 0.719; chosen on the training scan (0.919 → 0.924), where 3 or 4 gave the same, and 4 then diverged on
# pty-chi's scan (docs/fidelity.md, "Momentum twice per sweep")
DEFAULT_MOMENTUM_STEPS = 2
DEFAULT_ALPHA = 0.3  # rPIE's regularisation of the object step; 1 = ePIE's step
DEFAULT_PROBE_ALPHA = 1.0
BACKENDS = ("auto", "numpy", "numba", "onnx", "torch")
ENGINES = ("builtin", "ptychi")


def _number_in(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
               high_open: bool = False) -> float:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    v = float(value) if ok else float("nan")
    if not (np.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)):
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{name} must be a number in {lo}, {hi} (got {value!r})")
    return v


def prepare_backend(backend: str = "auto", device: str = "cpu") -> str:
    """Load what ``backend`` needs at its first refinement, now; returns the backend "auto" resolves to on ``device``.

    "auto" is, on the CPU, numba where it is installed and loads (numpy's
    update in compiled loops, the fastest there) and else numpy, and, on CUDA,
    torch when it is importable, else onnxruntime (measured in docs/fidelity.md).
    A numba that is installed but fails to load (a broken install) leaves
    "auto" on numpy with a warning: an optional accelerator never stops a
    refinement. Only numba has a loading cost (its import and its compiled
    kernels, ≈ 0.6 s per process with numba's cache warm, ≈ 10 s the first
    time on a machine): a host calls this at start-up, and ``ptycho-export
    evaluate`` before it times a refinement, as it loads the bundle before
    timing the network.
    """
    from ..reconstruction.compiled import load_kernels, numba_available

    if backend == "numba" and device == "cpu" and numba_available():
        load_kernels()  # a failure here is the caller's error: numba was asked for
    if backend != "auto":
        return backend
    if device != "cpu":
        try:
            import torch  # noqa: F401
            return "torch"
        except ImportError:
            return "onnx"
    if numba_available():
        try:
            load_kernels()
            return "numba"
        except Exception as exc:  # noqa: BLE001 - numba's own errors (typing, LLVM) share no base but this
            log.warning("numba is installed but its refinement kernels did not load (%s: %s): refining with the "
                        "numpy backend", type(exc).__name__, exc)
    return "numpy"


def make_backend(backend: str, device: str, obj: np.ndarray, probe: np.ndarray, **kwargs: Any):
    """The backend object for ``backend`` on ``device`` ("auto": ``prepare_backend``'s rule)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (got {device!r})")
    backend = prepare_backend(backend, device)
    if backend in ("numpy", "numba") and device != "cpu":
        raise ValueError(f"the {backend} backend runs on the CPU only: use device='cpu', or backend='torch'/'onnx'")
    if backend == "numpy":
        from .numpy_backend import NumpyBackend

        return NumpyBackend(obj, probe, **kwargs)
    if backend == "numba":
        from .numba_backend import NumbaBackend

        try:
            return NumbaBackend(obj, probe, **kwargs)
        except ImportError:
            raise ValueError("backend='numba' needs numba: pip install 'ptycho-runtime[fast]', or use "
                             "backend='numpy' (the same update, slower)") from None
    if backend == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(obj, probe, device=device, **kwargs)
    if backend == "onnx":
        from .onnx_backend import OnnxBackend

        return OnnxBackend(obj, probe, device=device, **kwargs)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")


class Refiner:
    """A refinement that keeps its object canvas between calls: for streaming, frames can be added as they come.

    ``start`` fixes the grid; pixels it does not cover begin as 1 (free
    space). ``add_frames`` appends measured frames; ``run(k)`` runs k sweeps
    over all frames added so far and returns a ``RefineResult``. See
    ``refine`` for the parameters; ``backend_options`` go to the backend
    (numba and onnx: ``threads``, how many threads share each batch, one per core and 2 at most by default;
    onnx also ``canvas_in_graph``).
    """

    def __init__(self, start: Reconstruction, probe: np.ndarray, *, backend: str = "auto", device: str = "cpu",
                 refine_probe: bool = False, momentum: float = DEFAULT_MOMENTUM, batching: str = "sparse",
                 alpha: float = DEFAULT_ALPHA, probe_alpha: float = DEFAULT_PROBE_ALPHA, step: float = 1.0,
                 seed: int = 0, max_batch: Optional[int] = None,
                 backend_options: Optional[dict[str, Any]] = None,
                 momentum_steps: int = DEFAULT_MOMENTUM_STEPS) -> None:
        P = np.asarray(probe)
        if P.ndim != 2 or P.shape[0] != P.shape[1] or P.shape[0] < 2:
            raise ValueError(f"probe must be a square [N, N] array (got shape {list(P.shape)})")
        if not np.all(np.isfinite(P)) or not np.any(P):
            raise ValueError("probe must be finite and not all zero: pass the scan's probe guess")
        if batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {', '.join(BATCHINGS)} (got {batching!r})")
        self.momentum = _number_in("momentum", momentum, 0, 1, high_open=True)
        if isinstance(momentum_steps, bool) or not isinstance(momentum_steps, (int, np.integer)) or momentum_steps < 1:
            raise ValueError(f"momentum_steps must be an integer >= 1 (got {momentum_steps!r})")
        self.momentum_steps = int(momentum_steps)
        self.alpha = _number_in("alpha", alpha, 0, 1, low_open=True)
        self.probe_alpha = _number_in("probe_alpha", probe_alpha, 0, 1, low_open=True)
        step = _number_in("step", step, 0, 2, low_open=True)
        if max_batch is not None and (isinstance(max_batch, bool) or int(max_batch) < 1):
            raise ValueError(f"max_batch must be an integer >= 1 or None (got {max_batch!r})")
        self.max_batch = None if max_batch is None else int(max_batch)
        self.start, self.batching, self.seed = start, batching, int(seed)
        self.N = P.shape[0]
        self.refine_probe = bool(refine_probe)
        obj = np.where(start.covered, start.object, np.complex64(1.0)).astype(np.complex64)
        if not np.all(np.isfinite(obj)):
            raise ValueError("start's object has NaN or infinite pixels where it is covered: refine a finite "
                             "reconstruction (check the network's output)")
        self._backend = make_backend(backend, device, obj, P.astype(np.complex64), alpha=self.alpha,
                                     probe_alpha=self.probe_alpha, refine_probe=self.refine_probe, step=step,
                                     **(backend_options or {}))
        self._measured: list[np.ndarray] = []
        self._rows = np.zeros(0, np.int64)
        self._cols = np.zeros(0, np.int64)
        self._weights = np.zeros((0, 4), np.float32)
        self._batches: Optional[list[np.ndarray]] = None
        self._measured_all: Optional[np.ndarray] = None
        self.sweeps_run = 0
        self.misfit: list[float] = []
        self._touched = np.zeros(start.object.shape, dtype=bool)
        self._n_marked = 0

    @property
    def n_frames(self) -> int:
        return int(self._rows.shape[0])

    def add_frames(self, amplitude: np.ndarray, positions: np.ndarray,
                   start: Optional[Reconstruction] = None) -> "Refiner":
        """Append frames: ``amplitude`` [n, N, N] in the probe's units (DC at N/2), ``positions`` [n, 2] (x, y).

        ``start``, for streaming: a newer starting reconstruction on the same
        grid (the network's canvas with the new frames stitched in). Pixels no
        refined frame has read yet take its values; refined pixels keep theirs.
        The momentum restarts (the object changed under it).
        """
        N = self.N
        if start is not None:
            self._merge_start(start)
        amp = np.asarray(amplitude, dtype=np.float32)
        if amp.ndim != 3 or amp.shape[1:] != (N, N):
            raise ValueError(f"amplitude must be [n, N, N] with the probe's N={N} (got {list(amp.shape)})")
        if not np.all(np.isfinite(amp)) or np.any(amp < 0):
            raise ValueError("amplitude must be finite and >= 0 (the square root of the measured intensity)")
        pos = np.asarray(positions, dtype=np.float64)
        if pos.shape != (amp.shape[0], 2) or not np.all(np.isfinite(pos)):
            raise ValueError(f"positions must be finite (x, y) pairs, shape [{amp.shape[0]}, 2] "
                             f"(got {list(pos.shape)})")
        x0, y0 = float(self.start.x_coords[0]), float(self.start.y_coords[0])
        starts = frame_origin(pos, N) - np.array([x0, y0])
        H, W = self.start.object.shape
        rows, cols, weights = window_corners(starts)
        if np.any(rows < 0) or np.any(cols < 0) or np.any(cols + N + 1 > W) or np.any(rows + N + 1 > H):
            raise ValueError(f"some frames fall outside the {H}×{W} object grid of the starting reconstruction; "
                             "reconstruct on a canvas sized to the scan (the default) before refining")
        self._measured.append(np.fft.ifftshift(amp, axes=(-2, -1)) * np.float32(N))  # unshifted |fft2| per frame
        self._rows = np.concatenate([self._rows, rows])
        self._cols = np.concatenate([self._cols, cols])
        self._weights = np.concatenate([self._weights, weights])
        self._batches = None
        self._measured_all = None
        return self

    def add_frames_of(self, other: "Refiner") -> "Refiner":
        """The frames ``other`` holds, shared, not copied: its measured amplitudes, windows and (same batching and
        seed) batches.

        For refiners of one scan on one grid (the start's candidates; the full
        resolution after the coarse level): the checks, the transform and the
        batching are done once, and the frames are held once.
        """
        if self.n_frames:
            raise ValueError("add_frames_of needs a Refiner that holds no frames yet")
        if (other.N != self.N or other.start.object.shape != self.start.object.shape
                or not np.array_equal(other.start.x_coords, self.start.x_coords)
                or not np.array_equal(other.start.y_coords, self.start.y_coords)):
            raise ValueError("add_frames_of takes frames from a Refiner on the same grid with the same N")
        self._measured_all = other._all_measured()
        self._measured = [] if self._measured_all is None else [self._measured_all]
        self._rows, self._cols, self._weights = other._rows, other._cols, other._weights
        same = (other.batching, other.seed, other.max_batch) == (self.batching, self.seed, self.max_batch)
        self._batches = other.batches() if same and other.n_frames else None
        return self

    def _all_measured(self) -> Optional[np.ndarray]:
        """Every frame added so far as one array (concatenated once after each ``add_frames``), None without frames."""
        if self._measured_all is None and self._measured:
            self._measured_all = np.concatenate(self._measured) if len(self._measured) > 1 else self._measured[0]
            self._measured = [self._measured_all]
        return self._measured_all

    def _merge_start(self, start: Reconstruction) -> None:
        old = self.start
        if (start.object.shape != old.object.shape or not np.array_equal(start.x_coords, old.x_coords)
                or not np.array_equal(start.y_coords, old.y_coords)):
            raise ValueError("start must be on the Refiner's grid (same shape, x_coords and y_coords): keep one "
                             "canvas for the whole scan (StreamingReconstructor with scan_positions)")
        take = start.covered & ~self._touched
        if take.any():
            obj = self._backend.get_object()
            obj[take] = start.object[take]
            self._backend.set_object(obj)
        self.start = start

    def _mark_touched(self) -> None:
        """Every pixel a frame's window reads is refined from now on (``_merge_start`` leaves it alone)."""
        side = self.N + 1
        for r, c in zip(self._rows[self._n_marked:], self._cols[self._n_marked:], strict=True):
            self._touched[r:r + side, c:c + side] = True
        self._n_marked = self.n_frames

    def multiply_object(self, factor: np.ndarray) -> None:
        """Multiply the object being refined (and its momentum) by ``factor`` [H, W], e.g. a fitted phase ramp."""
        if np.shape(factor) != self.start.object.shape:
            raise ValueError(f"factor {np.shape(factor)} must have the canvas's shape {self.start.object.shape}")
        self._backend.multiply_object(np.asarray(factor, dtype=np.complex64))

    def batches(self) -> list[np.ndarray]:
        """The frame groups one sweep visits (computed once per set of frames)."""
        if self._batches is None:
            self._batches = make_batches(self.batching, self._rows, self._cols, self.N, self.seed, self.max_batch)
        return self._batches

    def run(self, sweeps: int = DEFAULT_SWEEPS, *, progress: Optional[ProgressFn] = None,
            cancel: Optional[CancelFn] = None) -> RefineResult:
        """``sweeps`` sweeps over every frame added so far; ``progress(done, sweeps)`` after each.

        ``cancel`` (a callable returning True, or a ``threading.Event``) is
        checked before each batch; when set, ``RefinementCancelled`` is
        raised with the result so far in its ``partial``.
        """
        if isinstance(sweeps, bool) or not isinstance(sweeps, (int, np.integer)) or sweeps < 0:
            raise ValueError(f"sweeps must be an integer >= 0 (got {sweeps!r})")
        if self.n_frames == 0 and sweeps:
            raise ValueError("no frames to refine against: add_frames(amplitude, positions) first")
        t0 = time.perf_counter()
        self._all_measured()
        groups = self.batches() if sweeps else []
        if sweeps:
            self._mark_touched()
        order = np.random.default_rng(self.seed + self.sweeps_run)
        b = self._backend
        parallel = self.batching == "parallel"
        norm = float(self.n_frames * self.N**4) if self.n_frames else 1.0
        steps = 1 if parallel else max(1, min(self.momentum_steps, len(groups)))
        run = b.accumulate_batch if parallel else b.run_batch
        for k in range(int(sweeps)):
            total = 0.0
            visit = np.arange(len(groups)) if parallel else order.permutation(len(groups))
            for part in np.array_split(visit, steps):  # the momentum is applied after each part
                b.begin_momentum_step(self.momentum)
                for i in part:
                    if cancel_requested(cancel):
                        if hasattr(b, "take_misfit"):
                            b.take_misfit()
                        raise RefinementCancelled(f"refinement cancelled by the host after {k} of {sweeps} sweeps",
                                                  self._result(k, sweeps, t0, cancelled=True))
                    g = groups[i]
                    total += run(self._measured_all[g], self._rows[g], self._cols[g], self._weights[g])
                if parallel:
                    b.apply_accumulated()
                b.end_momentum_step(self.momentum)
            if hasattr(b, "take_misfit"):  # a device backend sums on the device and reads once per sweep
                total += b.take_misfit()
            self.sweeps_run += 1
            self.misfit.append(total / norm)  # Σ(|F(P·O)|/N − A)²/(n·N²), as far_field_misfit, before each update
            if progress is not None:
                progress(k + 1, int(sweeps))
        return self._result(int(sweeps), int(sweeps), t0)

    def _result(self, done: int, asked: int, t0: float, cancelled: bool = False) -> RefineResult:
        b = self._backend
        obj = b.get_object()
        recon = replace(self.start, object=obj, weight=self.start.weight.copy())  # same grid, pixel size, centre
        record = {"engine": "builtin", "backend": b.name, "device": b.device,
                  "provider": (getattr(b, "providers", None) or [b.name])[0], "sweeps": done,
                  "sweeps_requested": asked, "sweeps_total": self.sweeps_run, "batching": self.batching,
                  "batches": len(self._batches or []), "frames": self.n_frames, "momentum": self.momentum,
                  "momentum_steps_per_sweep": 1 if self.batching == "parallel" else self.momentum_steps,
                  "alpha": self.alpha, "step": b.step, "probe_updated": self.refine_probe,
                  "misfit": [float(m) for m in self.misfit[-done:]] if done else [],
                  "positions_refined": False, "cancelled": cancelled, "wall_s": time.perf_counter() - t0}
        return RefineResult(recon, b.get_probe(), record)


def refine(start: Reconstruction, amplitude: np.ndarray, positions: np.ndarray, probe: np.ndarray, *,
           sweeps: int = DEFAULT_SWEEPS, backend: str = "auto", device: str = "cpu", refine_probe: bool = False,
           momentum: float = DEFAULT_MOMENTUM, batching: str = "sparse", alpha: float = DEFAULT_ALPHA,
           engine: str = "builtin", seed: int = 0, max_batch: Optional[int] = None,
           progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None) -> RefineResult:
    """Refine ``start`` against the measured amplitudes; the object stays on ``start``'s grid.

    ``amplitude`` [n, N, N]: each frame's measured far-field amplitude in the
    probe's units (DC at pixel N/2); ``positions`` [n, 2] (x, y) on the grid of
    ``start``; ``probe`` [N, N]. Positions stay fixed.

    - ``batching``: ``"sparse"`` (default) updates groups of frames whose
      windows do not overlap, which is sequential ePIE's update, vectorised;
      ``"sequential"`` one frame at a time; ``"parallel"`` all frames from the
      same object, then one per-pixel-normalised step (numpy backend only).
    - ``momentum`` η: v ← η·v + ΔO, O ← O + η·v, with ΔO the change since the last
      step; ``Refiner``'s ``momentum_steps`` times per sweep (default 2; once with
      ``"parallel"``).
    - ``alpha``: rPIE's object-step regularisation (1 = ePIE's step).
    - ``refine_probe``: also update the probe (ePIE/rPIE's probe step, summed per batch).
    - ``backend``: ``"numpy"`` (reference), ``"numba"`` (numpy's update in
      compiled loops; ``pip install ptycho-runtime[fast]``), ``"onnx"``
      (onnxruntime, a refinement-step graph built by the runtime), ``"torch"``,
      or ``"auto"`` (numba, else numpy, on the CPU; torch, else onnx, on CUDA);
      ``device`` "cpu" or "cuda".
    - ``engine="ptychi"``: pty-chi's LSQML instead (``ptychi_engine.refine_ptychi``;
      needs torch and pty-chi).
    - ``progress(done, sweeps)`` after each sweep; ``cancel`` checked before
      each batch, raising ``RefinementCancelled`` (with ``partial``).
    """
    if engine == "ptychi":
        from .ptychi_engine import refine_ptychi

        return refine_ptychi(start, amplitude, positions, probe, iterations=sweeps, refine_probe=refine_probe,
                             device=device, progress=progress, cancel=cancel)
    if engine != "builtin":
        raise ValueError(f"engine must be one of {', '.join(ENGINES)} (got {engine!r})")
    refiner = Refiner(start, probe, backend=backend, device=device, refine_probe=refine_probe, momentum=momentum,
                      batching=batching, alpha=alpha, seed=seed, max_batch=max_batch)
    refiner.add_frames(amplitude, positions)
    return refiner.run(sweeps, progress=progress, cancel=cancel)
