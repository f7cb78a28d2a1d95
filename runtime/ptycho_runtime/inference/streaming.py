"""Live reconstruction during acquisition: feed frames as they arrive, read the object any time.

``StreamingReconstructor`` queues frames, and a worker thread runs them in
micro-batches: a batch starts when ``batch_size`` frames are waiting or when
the oldest waiting frame is ``max_latency_s`` old, whichever comes first, so
a slow trickle of frames still updates the image promptly and a fast stream
gets full batches. Each batch is stitched into a float64 canvas, so the live
object after all frames equals ``Bundle.reconstruct`` on the same frames and
grid (to ~1e-7, the difference being summation order).

The canvas grid must be known up front: pass the planned scan positions
(``scan_positions``, the usual case: the scan is planned before it runs) or the
host's object grid (``object_shape``, or ``grid``: an ``ObjectGrid`` with a
shape) whose frame the positions are given in. Positions may be in metres
(``units="metres"``, placed with the grid's pixel size and centre) and name
frame pixel (N−1)/2 unless ``frame_centre="N/2"``; patches outside a fixed
grid are clipped or dropped (``out_of_grid``), as in ``Bundle.reconstruct``.

For gridsize > 1 models, feed pre-grouped frames [k, C, N, N] with positions
[k, C, 2] (neighbour groups cannot be formed before the neighbours arrive).

``refine=`` (True, a number of sweeps, or a ``RefineSettings``; with
``probe=`` the scan's probe, else the bundle's training probe) also refines
the canvas against the frames while the scan runs (``stream_refinement``):
after each micro-batch, ``refine_between`` sweeps over every frame seen so
far (skipped while another batch is due: inference comes first), more while
the stream is idle, and ``close()`` runs the rest, so that every frame has
had the settings' ``sweeps`` sweeps over the whole scan. ``snapshot()`` is
then the refined object where refined and the network's elsewhere, with
``probe`` and ``refinement`` (the record) set. ``cancel`` stops refinement
(not the stream); ``RefineSettings.progress`` is called after each sweep.

What it needs of the model is ``PatchModel`` (``N``, ``channels``,
``prepare``, ``infer``, ``stitch_window``), which a ``Bundle`` is: this module
does not import ``bundle``, so ``Bundle.stream`` can import it at the top.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Optional, Protocol, Union

import numpy as np

from ..reconstruction.geometry import DEFAULT_CENTRE, ObjectGrid, make_grid, scan_positions_px
from ..reconstruction.inputs import check_positions, check_scan_positions, repair_bad_pixels
from ..reconstruction.stitching import Reconstruction, StitchCanvas
from .scan_refinement import RefineRequest, as_settings, measured_amplitude
from .stream_refinement import StreamRefinement

DEFAULT_REFINE_BETWEEN = 2
"""Sweeps after each micro-batch: enough for the live picture to follow the scan, little enough for inference."""


class PatchModel(Protocol):
    """What a stream runs frames through: a loaded ``Bundle`` (or anything with its inference API)."""

    N: int
    channels: int
    probe: np.ndarray  # the training probe: the refinement's probe when the host gives none

    def prepare(self, diffraction: np.ndarray, counts: Optional[bool] = None) -> np.ndarray: ...

    def infer(self, x: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray: ...

    def stitch_window(self, window: Union[str, np.ndarray, None] = "probe") -> Optional[np.ndarray]: ...


class StreamingReconstructor:
    """Micro-batched, incremental reconstruction on a background thread. Use as a context manager."""

    def __init__(self, bundle: PatchModel, *, scan_positions: Optional[np.ndarray] = None,
                 object_shape: Optional[tuple[int, int]] = None, batch_size: int = 16, max_latency_s: float = 0.05,
                 counts: Optional[bool] = None, crop: Optional[int] = None,
                 window: Union[str, np.ndarray, None] = "probe",
                 background: bool = True, grid: Optional[ObjectGrid] = None,
                 pixel_size_m: Optional[float | tuple[float, float]] = None,
                 object_centre_m: Optional[tuple[float, float]] = None, units: str = "pixels",
                 frame_centre: str = DEFAULT_CENTRE, bad_pixels: Optional[np.ndarray] = None,
                 out_of_grid: str = "clip", fill: complex = 0.0, refine: RefineRequest = None,
                 probe: Optional[np.ndarray] = None, refine_between: int = DEFAULT_REFINE_BETWEEN,
                 cancel: Optional[Any] = None) -> None:
        self.grid = make_grid(grid, object_shape, pixel_size_m, object_centre_m)
        fixed = self.grid is not None and self.grid.shape is not None
        if (scan_positions is not None) == fixed:
            raise ValueError("give exactly one of scan_positions (the planned scan, [n, 2] or [n, C, 2]) or "
                             "object_shape (H, W) / grid to fix the canvas grid")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if not max_latency_s > 0:
            raise ValueError(f"max_latency_s must be > 0 (got {max_latency_s})")
        if isinstance(refine_between, bool) or not isinstance(refine_between, (int, np.integer)) or refine_between < 0:
            raise ValueError(f"refine_between must be an integer >= 0 sweeps (got {refine_between!r})")
        settings = as_settings(refine)
        self._refinement = None if settings is None else StreamRefinement(
            settings, bundle.probe if probe is None else probe, bundle.N, fill=fill, cancel=cancel,
            probe_source="the bundle's training probe" if probe is None else "the host's probe")
        self.refine_between = int(refine_between)
        self.bundle = bundle
        self.batch_size = int(batch_size)
        self.max_latency_s = float(max_latency_s)
        self.counts = counts
        self.units = units
        self.frame_centre = frame_centre
        self.bad_pixels = bad_pixels
        window = None if crop is not None else bundle.stitch_window(window)  # as Bundle.reconstruct weights
        if scan_positions is not None:
            planned = self._to_px(scan_positions).reshape(-1, 2)
            check_scan_positions(planned, bundle.N)  # metres as pixels, outliers, a canvas too large to allocate
            self._canvas = StitchCanvas.for_positions(planned, bundle.N, crop=crop, window=window, fill=fill)
        else:
            self._canvas = StitchCanvas(self.grid.shape, bundle.N, (0, 0), crop=crop, window=window,
                                        out_of_grid=out_of_grid, fill=fill)
        self._pending_x: list[np.ndarray] = []
        self._pending_pos: list[np.ndarray] = []
        self._pending_amp: list[np.ndarray] = []  # measured amplitudes [k·C, N, N], when refining
        self._pending_n = 0
        self._oldest: Optional[float] = None
        self._lock = threading.Lock()  # guards the queue and the canvas
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._error: Optional[BaseException] = None
        self._in_flight = 0  # batches taken off the queue but not yet on the canvas
        self.frames_done = 0
        self.batches_done = 0
        self.latencies_s: list[float] = []  # queue-entry → on-canvas, per batch (oldest frame)
        self._worker: Optional[threading.Thread] = None
        if background:
            self._worker = threading.Thread(target=self._loop, name="ptycho-stream", daemon=True)
            self._worker.start()

    # ------------------------------------------------------------------ producer side

    def feed(self, frames: np.ndarray, positions: np.ndarray) -> None:
        """Queue frames [k, N, N] / [k, C, N, N] with positions [k, 2] / [k, C, 2]. Validated now, not later."""
        self._raise_worker_error()
        if self._closed:
            raise RuntimeError("feed() after close(): this StreamingReconstructor is finished")
        b = self.bundle
        x = repair_bad_pixels(b.prepare(frames, self.counts), self.bad_pixels)
        pos = check_positions(self._to_px(positions), x.shape[0], b.channels)
        self._canvas.check_inside(pos.reshape(-1, 2))  # a bad position must not kill the worker later
        amp = None
        if self._refinement is not None:
            amp = measured_amplitude(frames, self.counts)
            if self.bad_pixels is not None:  # repaired in place: never in the host's own array
                amp = repair_bad_pixels(np.array(amp, copy=True), self.bad_pixels)
        with self._wake:
            self._pending_x.append(x)
            self._pending_pos.append(pos)
            if amp is not None:
                self._pending_amp.append(amp)
            self._pending_n += x.shape[0]
            if self._oldest is None:
                self._oldest = time.perf_counter()
            self._wake.notify()
        if self._worker is None and self._pending_n >= self.batch_size:
            self._process(force=False)

    def flush(self) -> None:
        """Run everything queued now (blocks until it is on the canvas)."""
        self._raise_worker_error()
        self._process(force=True)
        with self._wake:  # a batch the worker took before this call may still be running
            while self._in_flight and self._error is None:
                self._wake.wait(0.1)
        self._raise_worker_error()

    def _to_px(self, positions: np.ndarray) -> np.ndarray:
        return scan_positions_px(positions, self.bundle.N, self.units, self.grid, self.frame_centre)

    def snapshot(self) -> Reconstruction:
        """The live object as it is now (a copy; with pixel size and centre when the grid has them).

        When refining: the refined object where refined frames read it, the
        network's elsewhere, with ``probe`` and ``refinement`` set once a sweep has run.
        """
        with self._lock:
            rec = self._canvas.result()
        if self._refinement is not None:
            rec = self._refinement.apply(rec)
        if self.grid is not None and self.grid.pixel_size_m is not None:
            rec = dataclasses.replace(rec, pixel_size_m=self.grid.pixel_size_m,
                                      centre_m=self.grid.centre_of(self._canvas.origin, self._canvas.shape))
        return rec

    def close(self) -> Reconstruction:
        """Flush, stop the worker, run the refinement sweeps still owed, and return the final object."""
        if not self._closed:
            self.flush()
            with self._wake:
                self._closed = True
                self._wake.notify_all()
            if self._worker is not None:
                self._worker.join()
        self._raise_worker_error()
        if self._refinement is not None:
            self._refinement.sweep(self._refinement.owed)
        return self.snapshot()

    @property
    def refinement(self) -> Optional[StreamRefinement]:
        """The stream's refinement state (``owed`` sweeps, ``n_frames``, ``cancelled``), or None when off."""
        return self._refinement

    def __enter__(self) -> "StreamingReconstructor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pending(self) -> int:
        return self._pending_n

    # ------------------------------------------------------------------ worker side

    def _due(self) -> bool:
        """A micro-batch is waiting to run (lock not needed: a stale answer only delays a sweep)."""
        return self._pending_n >= self.batch_size or (
            self._pending_n > 0 and time.perf_counter() - (self._oldest or 0.0) >= self.max_latency_s)

    def _take(self, force: bool) -> Optional[tuple[np.ndarray, np.ndarray, Optional[np.ndarray], float]]:
        """Pop up to batch_size frames if a batch is due (lock held by caller)."""
        if self._pending_n == 0:
            return None
        due = force or self._pending_n >= self.batch_size or (
            time.perf_counter() - (self._oldest or 0.0) >= self.max_latency_s)
        if not due:
            return None
        x = np.concatenate(self._pending_x)
        pos = np.concatenate(self._pending_pos)
        take = x.shape[0] if force else min(self.batch_size, x.shape[0])
        oldest = self._oldest or time.perf_counter()
        rest_x, rest_pos = x[take:], pos[take:]
        self._pending_x = [rest_x] if rest_x.shape[0] else []
        self._pending_pos = [rest_pos] if rest_pos.shape[0] else []
        amp = None
        if self._pending_amp:
            per = x.shape[1] if x.ndim == 4 else 1  # frames per group
            all_amp = np.concatenate(self._pending_amp)
            amp, rest_amp = all_amp[:take * per], all_amp[take * per:]
            self._pending_amp = [rest_amp] if rest_amp.shape[0] else []
        self._pending_n = rest_x.shape[0]
        self._oldest = time.perf_counter() if self._pending_n else None
        self._in_flight += 1
        return x[:take], pos[:take], amp, oldest

    def _run_batch(self, x: np.ndarray, pos: np.ndarray, amp: Optional[np.ndarray], queued_at: float) -> None:
        try:
            patches = self.bundle.infer(x, self.batch_size)
            with self._lock:
                self._canvas.add(patches.reshape(-1, self.bundle.N, self.bundle.N), pos.reshape(-1, 2))
                self.frames_done += x.shape[0]
                self.batches_done += 1
                self.latencies_s.append(time.perf_counter() - queued_at)
                if amp is not None and self._refinement is not None:  # in canvas order, with this canvas
                    self._refinement.add(self._canvas.result(), amp, pos.reshape(-1, 2))
            if amp is not None and self._refinement is not None:
                self._refinement.sweep(self.refine_between, stop=self._due)
        finally:
            with self._wake:
                self._in_flight -= 1
                self._wake.notify_all()

    def _process(self, force: bool) -> None:
        while True:
            with self._lock:
                batch = self._take(force)
            if batch is None:
                return
            self._run_batch(*batch)

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    idle_sweep = False
                    while not self._closed:
                        if self._pending_n >= self.batch_size:
                            break
                        if self._pending_n:
                            wait = self.max_latency_s - (time.perf_counter() - (self._oldest or 0.0))
                            if wait <= 0:
                                break
                            self._wake.wait(wait)
                        elif self._refinement is not None and self._refinement.owed:
                            idle_sweep = True  # nothing to infer: improve the picture meanwhile
                            break
                        else:
                            self._wake.wait()
                    if self._closed and self._pending_n == 0:
                        return
                    batch = None if idle_sweep else self._take(force=self._closed)
                if idle_sweep:
                    self._refinement.sweep(1, stop=self._due)
                elif batch is not None:
                    self._run_batch(*batch)
        except BaseException as exc:  # noqa: BLE001 - surfaced to the host on its next call, never lost
            self._error = exc

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the streaming worker failed: {self._error}") from self._error
