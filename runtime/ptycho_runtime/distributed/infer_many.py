"""Reconstruct many scans on a Dask cluster (``ptycho-runtime infer-many``).

Why Dask: reprocessing a beamtime is hundreds of scans of thousands of
frames, on a cluster that scientific Python already drives with
``dask.distributed`` (and ``dask-jobqueue`` on SLURM/PBS). Dask schedules,
moves data, and retries work lost with a dead worker; this module only says
what the work is.

The work, per scan (every step a Dask task, so any of them can be re-run):

1. ``load_scan``: read the NPZ exactly as ``ptycho-runtime infer`` does
   (``read_npz_arrays``, the same units, centre and grouping decisions, made
   on the whole scan) into the graph's input and the positions.
2. ``take_chunk`` + ``reconstruct_chunk``: ``chunk_frames`` groups at a time
   are predicted and stitched into a *partial canvas*: the float64 sums
   Σw·patch and Σw over the chunk's bounding box (``StitchCanvas.sums``).
3. ``merge_partials`` / ``finish_scan``: stitching is a weighted sum, so
   the partial canvases add up to the whole scan's canvas exactly (up to
   float64 summation order), in a fixed tree order; the object is
   Σw·patch / Σw as in ``Bundle.reconstruct``.
4. ``refine_stitched`` (unless ``refine`` is off): the whole scan's object
   refined against its own frames with its own ``probeGuess``, as
   ``ptycho-runtime infer`` refines (``scan_refinement.refine_scan``, the
   default sweeps unless told otherwise). One task per scan: every sweep
   reads all its frames, so it runs where the scan was loaded.

The driver then writes each scan's HDF5 exactly as ``infer`` writes it
(``files.reconstruction_file.write_reconstruction``, atomically), so a scan is either complete or
absent, never partial.

Each worker loads the bundle once, in ``BundleWorkerPlugin.setup`` (also
when Dask restarts a killed worker); the plugin first checks that the file
the worker sees has the SHA-256 the driver saw. A scan whose task raises
(bad file, wrong N, …) fails alone: its error is reported and the other
scans are written. Bundle, scans and the output folder are read by path:
on a cluster they must be on a filesystem every worker (and the driver)
sees under the same path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .. import format as fmt
from ..files.reconstruction_file import Provenance, write_reconstruction
from ..format.checksum import file_sha256
from ..inference.compatibility import check_scan
from ..inference.remote_errors import ClusterError
from ..inference.scan_refinement import RefineRequest, RefineSettings, as_settings, refine_scan
from ..reconstruction.geometry import DEFAULT_CENTRE
from ..reconstruction.stitching import Reconstruction, StitchCanvas, canvas_bounds

log = logging.getLogger("ptycho_runtime")

INSTALL_HINT = "infer-many needs Dask: pip install 'ptycho-runtime[dask]'"
PLUGIN_PREFIX = "ptycho-runtime-bundle-"
DEFAULT_CHUNK_FRAMES = 512
MERGE_FAN_IN = 8
CONNECT_TIMEOUT_S = 10.0
WAIT_FOR_WORKERS_S = 120.0
NO_WORKERS_TIMEOUT_S = 300.0  # a cluster left with no worker this long fails the scans still running
WORKER_CHECK_INTERVAL_S = 1.0


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return distributed


# --------------------------------------------------------------------------- worker side


try:  # the plugin base class, when Dask is installed (this module imports without it)
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - depends on the install
    _WorkerPlugin = object  # type: ignore[assignment,misc]


class BundleWorkerPlugin(_WorkerPlugin):  # type: ignore[misc,valid-type]
    """Loads the bundle once per worker process, and checks it is the file the driver saw.

    ``setup`` runs when the plugin is registered and again on every worker
    that (re)joins, so a worker Dask restarts after a crash has the bundle
    before it runs a task.
    """

    def __init__(self, path: str, sha256: str, device: str = "auto",
                 intra_op_threads: Optional[int] = None) -> None:
        self.path = str(path)
        self.sha256 = sha256
        self.device = device
        self.intra_op_threads = intra_op_threads
        self.name = PLUGIN_PREFIX + sha256[:16]
        self.bundle: Any = None
        self.error: Optional[str] = None

    def setup(self, worker: Any = None) -> None:
        from ..inference.bundle import load_bundle

        try:
            seen = file_sha256(self.path)
        except OSError as exc:
            self.error = (f"worker {getattr(worker, 'address', '?')} cannot read the bundle {self.path} "
                          f"({exc.strerror or exc}): put it on a filesystem every worker sees under the same path")
            raise ClusterError(self.error) from None
        if seen != self.sha256:
            self.error = (f"worker {getattr(worker, 'address', '?')} sees a different file at {self.path} (sha256 "
                          f"{seen[:16]}…, the driver's is {self.sha256[:16]}…): give every worker the same bundle")
            raise ClusterError(self.error)
        self.bundle = load_bundle(self.path, backend="onnx", device=self.device,
                                  intra_op_threads=self.intra_op_threads)

    def teardown(self, worker: Any = None) -> None:
        self.bundle = None


def _bundle(plugin_name: str) -> Any:
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins.get(plugin_name)
    if plugin is None or plugin.bundle is None:
        why = getattr(plugin, "error", None) or "the bundle plugin is not registered on this worker"
        raise ClusterError(f"worker {worker.address} has no bundle loaded: {why}")
    return plugin.bundle


@dataclass
class ScanPlan:
    """What the driver needs to know about a loaded scan (small: no frames)."""

    n_patterns: int
    n_groups: int
    origin: tuple[int, int]
    shape: tuple[int, int]
    positions: np.ndarray                 # [n, 2] as read (what infer writes)
    params: dict[str, Any]
    backend: str
    device: str
    providers: list[str]
    notes: dict[str, Any] = field(default_factory=dict)  # as infer writes them: the probe's scale, the mismatches


@dataclass
class Partial:
    """A partial canvas: Σw·Re, Σw·Im, Σw over a box whose pixel (0, 0) is object pixel ``origin``."""

    origin: tuple[int, int]
    re: np.ndarray
    im: np.ndarray
    wsum: np.ndarray
    n_patches: int = 0


Loaded = tuple  # (plan, graph input [g, C, N, N], positions [g, C, 2], and, to refine: amplitude [n, N, N], probe)


def load_scan(plugin_name: str, scan_path: str, units: str = "auto", counts: bool = False,
              position_centre: str = DEFAULT_CENTRE, keep_frames: bool = False, groups: str = "all") -> Loaded:
    """Task: ``read_scan`` with this worker's bundle."""
    return read_scan(_bundle(plugin_name), scan_path, units, counts, position_centre, keep_frames, groups)


def read_scan(bundle: Any, scan_path: str, units: str = "auto", counts: bool = False,
              position_centre: str = DEFAULT_CENTRE, keep_frames: bool = False, groups: str = "all") -> Loaded:
    """Read a scan as ``infer`` does → (plan, graph input [g, C, N, N], positions [g, C, 2]).

    ``keep_frames`` (for refinement) appends the measured amplitudes [n, N, N]
    and the scan's ``probeGuess``, both in the normalised data's units.
    ``groups``: "all" or "cover" (``Bundle.group``; a refined scan's start
    needs only a cover, ``RefineSettings.start_groups``).
    """
    from ..files.npz import read_npz_arrays

    scan = read_npz_arrays(scan_path, counts=counts, units=units, position_centre=position_centre)
    positions = np.stack([scan["xcoords"], scan["ycoords"]], axis=1)
    x, pos = bundle.group(scan["diffraction"], positions, counts=False, groups=groups)  # reconstruct's grouping
    origin, shape = canvas_bounds(pos.reshape(-1, 2), bundle.N)
    mismatches = (check_scan(bundle.contents.physics, bundle.params, scan.get("probeGuess"), scan.get("nphotons"))
                  if hasattr(bundle, "contents") else [])
    plan = ScanPlan(int(positions.shape[0]), int(x.shape[0]), origin, shape, positions, bundle.params,
                    bundle.backend, bundle.device, bundle.providers,
                    notes={"probe_scale": scan.get("probe_scale"), "mismatches": mismatches})
    if keep_frames:
        return plan, x, pos, np.asarray(scan["diffraction"], np.float32), scan["probeGuess"]
    return plan, x, pos


def scan_plan(loaded: Loaded) -> ScanPlan:
    return loaded[0]


def take_chunk(loaded: Loaded, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Task: groups [start, stop) of a loaded scan (runs where the scan is; only the chunk travels)."""
    return loaded[1][start:stop].copy(), loaded[2][start:stop].copy()


def reconstruct_chunk(plugin_name: str, chunk: tuple[np.ndarray, np.ndarray],
                      batch_size: Optional[int] = None) -> Partial:
    """Task: ``chunk_partial`` with this worker's bundle."""
    return chunk_partial(_bundle(plugin_name), chunk, batch_size)


def chunk_partial(bundle: Any, chunk: tuple[np.ndarray, np.ndarray], batch_size: Optional[int] = None) -> Partial:
    """Predict a chunk and stitch it, with the bundle's window, into a partial canvas."""
    x, pos = chunk
    patches = bundle.infer(x, batch_size)
    flat_pos = pos.reshape(-1, 2)
    canvas = StitchCanvas.for_positions(flat_pos, bundle.N, window=bundle.stitch_window("probe"))
    canvas.add(patches.reshape(-1, bundle.N, bundle.N), flat_pos)
    return Partial(canvas.origin, *canvas.sums(), n_patches=canvas.n_patches)


def merge_partials(*parts: Partial) -> Partial:
    """Task: add partial canvases (in the order given) into one over their union box."""
    x0 = min(p.origin[0] for p in parts)
    y0 = min(p.origin[1] for p in parts)
    x1 = max(p.origin[0] + p.wsum.shape[1] for p in parts)
    y1 = max(p.origin[1] + p.wsum.shape[0] for p in parts)
    shape = (y1 - y0, x1 - x0)
    sums = [np.zeros(shape), np.zeros(shape), np.zeros(shape)]
    for p in parts:
        r, c = p.origin[1] - y0, p.origin[0] - x0
        h, w = p.wsum.shape
        for acc, arr in zip(sums, (p.re, p.im, p.wsum), strict=True):
            acc[r:r + h, c:c + w] += arr
    return Partial((x0, y0), *sums, n_patches=sum(p.n_patches for p in parts))


def finish_scan(plan: ScanPlan, *parts: Partial) -> Reconstruction:
    """Task: the whole scan's canvas from its partials → the stitched object, as ``Bundle.reconstruct`` returns it."""
    N = int(plan.params["N"])
    canvas = StitchCanvas(plan.shape, N, plan.origin, crop=N)  # the window was applied in the chunks
    for p in parts:
        canvas.add_sums(p.origin, p.re, p.im, p.wsum, p.n_patches)
    return canvas.result()


def refine_stitched(loaded: Loaded, recon: Reconstruction, settings: RefineSettings) -> Reconstruction:
    """Task: the stitched object refined against the scan's frames with its own probe, as ``infer`` refines it.

    ``loaded`` must come from ``read_scan(..., keep_frames=True)``. The
    result carries ``probe`` and ``refinement`` (the record the output file keeps).
    """
    if len(loaded) < 5:
        raise ValueError("refine_stitched needs the scan's frames: load it with keep_frames=True")
    plan, amplitude, probe = loaded[0], loaded[3], loaded[4]
    # as Bundle.reconstruct(refine=..., probe=probeGuess) in infer: the host's probe, uncovered pixels 0
    rec = refine_scan(recon, amplitude, plan.positions, probe, settings, probe_source="the host's probe", fill=0.0)
    network_groups = {"rule": settings.start_groups, "groups": plan.n_groups, "frames": plan.n_patterns}
    return replace(rec, refinement={**rec.refinement, "network_groups": network_groups})


# --------------------------------------------------------------------------- driver side


@dataclass
class ScanResult:
    """One scan's outcome: its output file, or the error that stopped it (the other scans are unaffected)."""

    scan: str
    output: Path
    n_patterns: int = 0
    elapsed_s: float = 0.0
    error: Optional[str] = None
    refinement: Optional[dict[str, Any]] = None  # the record of the refinement that ran (None: network only)

    @property
    def ok(self) -> bool:
        return self.error is None


def output_paths(scans: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> dict[str, Path]:
    """``OUT_DIR/<scan stem>.h5`` per scan; two scans with one stem would overwrite each other: refused."""
    out: dict[str, Path] = {}
    seen: dict[str, str] = {}
    for s in scans:
        stem = Path(s).stem
        if stem in seen:
            raise ValueError(f"scans {seen[stem]} and {s} would both be written to {stem}.h5; rename one, or run "
                             "them in separate infer-many calls with different output folders")
        seen[stem] = str(s)
        out[str(s)] = Path(out_dir) / f"{stem}.h5"
    return out


@contextlib.contextmanager
def dask_client(scheduler: str = "local", workers: Optional[int] = None) -> Iterator[Any]:
    """A ``distributed.Client``: a ``LocalCluster`` of ``workers`` processes, or the scheduler at ``tcp://…``.

    For a remote scheduler, ``workers`` (if given) is waited for, at most
    ``WAIT_FOR_WORKERS_S``. Errors reaching the scheduler are ``ClusterError``.
    """
    distributed = _import_distributed()
    if scheduler == "local":
        n = workers or 2
        if n < 1:
            raise ValueError(f"--workers must be >= 1 (got {n})")
        with contextlib.ExitStack() as stack:
            # silence_logs: a failing scan is reported once, by infer_many, not with each worker's traceback
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0", host="127.0.0.1",
                silence_logs=logging.CRITICAL))
            yield stack.enter_context(distributed.Client(cluster))
        return
    if not scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        raise ValueError(f"--scheduler must be 'local' or a scheduler address such as tcp://HOST:8786 "
                         f"(got {scheduler!r})")
    try:
        client = distributed.Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {scheduler} within {CONNECT_TIMEOUT_S:g} s "
                           f"({type(exc).__name__}): start it (dask scheduler, or a dask-jobqueue cluster) or check "
                           "the address", scheduler) from None
    try:
        if workers:
            try:
                client.wait_for_workers(workers, timeout=WAIT_FOR_WORKERS_S)
            except (TimeoutError, OSError) as exc:
                raise ClusterError(f"the Dask scheduler at {scheduler} has fewer than {workers} workers after "
                                   f"{WAIT_FOR_WORKERS_S:g} s ({exc}); start more workers or lower --workers",
                                   scheduler) from None
        yield client
    finally:
        client.close()


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _tree_merge(client: Any, parts: list[Any]) -> list[Any]:
    """Merge futures of partials in fixed groups until at most ``MERGE_FAN_IN`` remain (deterministic order)."""
    while len(parts) > MERGE_FAN_IN:
        parts = [client.submit(merge_partials, *parts[i:i + MERGE_FAN_IN])
                 for i in range(0, len(parts), MERGE_FAN_IN)]
    return parts


def _completed(queue: Any, client: Any, no_workers_timeout_s: float) -> Iterator[Any]:
    """Futures of ``queue`` as they finish (more may be added meanwhile); never waits forever on an empty cluster.

    Dask queues tasks until a worker appears, so a cluster whose workers all
    went away (jobs past their walltime, nodes lost) would wait for ever:
    after ``no_workers_timeout_s`` without any worker this raises ``ClusterError``.
    """
    seen = checked = time.monotonic()
    while not queue.is_empty():
        if queue.has_ready():
            yield from queue.next_batch(block=False)
            continue
        now = time.monotonic()
        if now - checked >= WORKER_CHECK_INTERVAL_S:
            checked = now
            if client.scheduler_info().get("workers"):
                seen = now
            elif now - seen > no_workers_timeout_s:
                raise ClusterError(f"the Dask cluster at {client.scheduler.address} has had no workers for "
                                   f"{no_workers_timeout_s:g} s; start workers (cluster.scale(...), dask worker "
                                   "ADDRESS) and run the failed scans again", client.scheduler.address)
        time.sleep(0.02)


def _describe(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class _ScanRun:
    """The driver's bookkeeping for one ``infer_many`` call: which future is which scan's which stage."""

    def __init__(self, client: Any, plugin_name: str, bundle_file: str, results: dict[str, ScanResult],
                 chunk_frames: int, batch_size: Optional[int],
                 on_result: Optional[Callable[[ScanResult], None]],
                 refine: Optional[RefineSettings] = None) -> None:
        self.client = client
        self.plugin_name = plugin_name
        self.bundle_file = bundle_file
        self.results = results
        self.chunk_frames = chunk_frames
        self.batch_size = batch_size
        self.on_result = on_result
        self.refine = refine
        self.stage: dict[Any, tuple[str, str]] = {}   # future → (scan, "plan" | "final")
        self.held: dict[str, list[Any]] = {}          # scan → its futures (keeps its data on the workers)
        self.started: dict[str, float] = {}
        self.plans: dict[str, ScanPlan] = {}

    def submit(self, scan: str, units: str, counts: bool, position_centre: str) -> Any:
        """Load the scan on a worker; return the future of its (small) plan."""
        self.started[scan] = time.perf_counter()
        loaded = self.client.submit(load_scan, self.plugin_name, scan, units, counts, position_centre,
                                    self.refine is not None, "all" if self.refine is None else self.refine.start_groups)
        plan = self.client.submit(scan_plan, loaded)
        self.held[scan] = [loaded, plan]
        self.stage[plan] = (scan, "plan")
        return plan

    def advance(self, fut: Any) -> Optional[Any]:
        """Handle a finished future: a plan → submit the chunks and the reduction (returned); a result → write."""
        scan, stage = self.stage.pop(fut)
        try:
            value = fut.result()
        except Exception as exc:  # noqa: BLE001 - the scan's own error (bad file, KilledWorker, ...)
            self._done(scan, _describe(exc))
            return None
        if stage == "plan":
            self.plans[scan] = value
            loaded = self.held[scan][0]
            parts = [self.client.submit(reconstruct_chunk, self.plugin_name,
                                        self.client.submit(take_chunk, loaded, a, b), self.batch_size)
                     for a, b in _chunks(value.n_groups, self.chunk_frames)]
            final = self.client.submit(finish_scan, value, *_tree_merge(self.client, parts))
            if self.refine is not None:
                final = self.client.submit(refine_stitched, loaded, final, self.refine)
            self.held[scan].append(final)
            self.stage[final] = (scan, "final")
            return final
        plan = self.plans[scan]
        elapsed = time.perf_counter() - self.started[scan]
        rate = plan.n_patterns / elapsed if elapsed > 0 else float("inf")
        made_by = Provenance(self.bundle_file, plan.params, plan.backend, plan.device, plan.providers)
        result = self.results[scan]
        try:
            write_reconstruction(result.output, value, plan.positions, made_by, rate, elapsed, scan, notes=plan.notes)
        except OSError as exc:
            self._done(scan, f"cannot write {result.output}: {_describe(exc)}")
            return None
        result.n_patterns, result.elapsed_s, result.refinement = plan.n_patterns, elapsed, value.refinement
        self._done(scan, None)
        return None

    def fail_unfinished(self, error: str) -> None:
        """Mark every scan still in flight failed and cancel its work (the cluster cannot finish it)."""
        for scan in sorted({s for s, _ in self.stage.values()}):
            self._done(scan, error)
        self.stage.clear()

    def _done(self, scan: str, error: Optional[str]) -> None:
        self.results[scan].error = error
        futures = self.held.pop(scan, [])  # dropping them releases the scan's data on the workers
        if error is not None and futures:
            self.client.cancel(futures)
        if self.on_result:
            self.on_result(self.results[scan])


def infer_many(client: Any, bundle_path: str | os.PathLike, scans: Sequence[str | os.PathLike],
               out_dir: str | os.PathLike, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
               batch_size: Optional[int] = None, units: str = "auto", counts: bool = False,
               position_centre: str = DEFAULT_CENTRE, device: str = "auto", intra_op_threads: Optional[int] = None,
               on_result: Optional[Callable[[ScanResult], None]] = None,
               no_workers_timeout_s: Optional[float] = None, refine: RefineRequest = True) -> list[ScanResult]:
    """Reconstruct every scan on the cluster behind ``client``; write ``OUT_DIR/<stem>.h5`` per scan.

    ``refine`` (as ``ptycho-runtime infer``: on by default, the default
    sweeps): each scan's stitched object is then refined against its frames
    with its own ``probeGuess`` (``refine_stitched``); a number of sweeps or
    a ``RefineSettings`` (without ``progress``) to choose, None/False/0 for
    the network alone. The output file records what ran.

    Returns one ``ScanResult`` per scan, in the order given; a failed scan
    carries its error and has no output file. ``on_result`` is called as each
    scan finishes. Raises ``ClusterError`` when no worker can load the bundle, or when the cluster has
    had no worker for ``no_workers_timeout_s`` (default ``NO_WORKERS_TIMEOUT_S``; the scans not finished by
    then are marked failed first).
    """
    distributed = _import_distributed()
    if isinstance(chunk_frames, bool) or int(chunk_frames) < 1:
        raise ValueError(f"chunk_frames must be >= 1 (got {chunk_frames!r})")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    settings = as_settings(refine)
    if settings is not None and settings.progress is not None:
        raise ValueError("RefineSettings.progress cannot run on Dask workers: leave it None (on_result reports "
                         "each scan as it is written)")
    bundle_file = fmt.resolve_bundle_path(bundle_path).resolve()
    scan_paths = [str(Path(s).resolve()) for s in scans]
    outputs = output_paths(scan_paths, out_dir)
    missing = [s for s in scan_paths if not Path(s).is_file()]
    results = {s: ScanResult(s, outputs[s]) for s in scan_paths}
    for s in missing:
        results[s].error = f"FileNotFoundError: no scan file at {s}"
        if on_result:
            on_result(results[s])
    plugin = BundleWorkerPlugin(str(bundle_file), file_sha256(bundle_file), device, intra_op_threads)
    try:
        client.register_plugin(plugin, name=plugin.name)
    except Exception as exc:  # noqa: BLE001 - whatever setup raised on a worker, re-raised by Dask
        raise ClusterError(f"the Dask workers cannot load the bundle: {_describe(exc)}") from None
    run = _ScanRun(client, plugin.name, str(bundle_file), results, int(chunk_frames), batch_size, on_result,
                   settings)
    queue = distributed.as_completed()
    try:
        for s in scan_paths:
            if s not in missing:
                queue.add(run.submit(s, units, counts, position_centre))
        wait_s = NO_WORKERS_TIMEOUT_S if no_workers_timeout_s is None else float(no_workers_timeout_s)
        try:
            for fut in _completed(queue, client, wait_s):
                follow_up = run.advance(fut)
                if follow_up is not None:
                    queue.add(follow_up)
        except ClusterError as exc:
            run.fail_unfinished(f"ClusterError: {exc}")
            raise
    finally:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(plugin.name)
    return [results[s] for s in scan_paths]
