"""A bundle kept warm in a process of its own: for hosts that must not run inference in their own process.

Why a process: acquisition software such as ptychodus forbids a CUDA context
in its main process (it mixes back ends built on different GPU frameworks),
and its own answer — a fresh process per call that loads the model again —
costs a process start and a model load on every call (about 3 s of 9 s on
1,000 patterns). ``BundleWorker`` starts one ``spawn``ed process per bundle,
loads the bundle there once, and serves any number of calls: the host's
process never imports a GPU framework, and no call after the first pays a
start or a load.

Protocol (one job at a time, over a ``multiprocessing`` pipe; pickled numpy
arrays): the parent sends a job; the worker runs ``Bundle.reconstruct`` and
sends, between micro-batches, progress (with a snapshot of the object so far
when asked for) and, with ``refine=``, after each refinement sweep
(``stage="refinement"``, no snapshot), then the result or the error,
re-raised in the parent as its own type. ``refine`` crosses as plain data
(None, a bool, a number of sweeps, or a dict of ``RefineSettings`` fields
without ``progress``): the worker builds the settings, with a progress of
its own. Log records of the worker are re-emitted in the parent under their
own names (``ptycho_runtime.*``). Cancellation is a shared job id the worker
reads between micro-batches and refinement batches, so it works while the
worker computes.
A worker that dies (killed, out of memory) is noticed by the next call,
which raises ``WorkerError``; the call after that starts a new one.
"""

from __future__ import annotations

import builtins
import importlib
import itertools
import logging
import multiprocessing
import os
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, fields
from typing import Any, Iterator, Optional, Union

import numpy as np

from ..reconstruction.stitching import Reconstruction

log = logging.getLogger(__name__)

_POLL_S = 0.2


class WorkerError(RuntimeError):
    """The worker process could not start, or died during a call (the next call starts a new one)."""


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total``: frame groups between micro-batches (``stage="inference"``, ``snapshot`` the object
    so far, or None), or sweeps (``stage="refinement"``, no snapshot)."""

    done: int
    total: int
    snapshot: Optional[Reconstruction] = None
    stage: str = "inference"


def plain_refine(refine: Any) -> Any:
    """``refine`` as the plain data a spawned worker receives: None/bool/int as they are, settings as a dict.

    A ``RefineSettings`` with a ``progress`` callable is refused: progress
    comes back as ``Progress(stage="refinement")`` events instead.
    """
    from ..inference.scan_refinement import RefineSettings, as_settings

    if isinstance(refine, dict):
        RefineSettings(**refine)  # a bad field or value is the caller's error, raised here rather than in the worker
        return dict(refine)
    if refine is None or isinstance(refine, (bool, int, np.integer)):
        as_settings(refine)
        return int(refine) if isinstance(refine, np.integer) else refine

    if isinstance(refine, RefineSettings):
        if refine.progress is not None:
            raise TypeError("RefineSettings.progress is not available through a worker: iterate over run() for "
                            "Progress(stage='refinement') events")
        return {f.name: getattr(refine, f.name) for f in fields(refine) if f.name != "progress"}
    raise TypeError(f"refine must be None, True/False, a number of sweeps, a dict of RefineSettings fields or a "
                    f"RefineSettings (got {type(refine).__name__})")


def _worker_settings(refine: Any, progress: Any) -> Any:
    """Worker side: the plain ``refine`` → ``RefineSettings`` reporting each sweep through ``progress``, or None."""
    from dataclasses import replace

    from ..inference.scan_refinement import RefineSettings, as_settings

    settings = RefineSettings(**refine) if isinstance(refine, dict) else as_settings(refine)
    return None if settings is None else replace(settings, progress=progress)


@dataclass(frozen=True)
class Done:
    """The call's result and how long the worker spent on it."""

    reconstruction: Reconstruction
    seconds: float


class _LogForwarder(logging.Handler):
    """Worker side: send every ``ptycho_runtime`` record to the parent (formatted; records may not pickle)."""

    def __init__(self, conn: Any, lock: threading.Lock) -> None:
        super().__init__()
        self._conn, self._lock = conn, lock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with self._lock:
                self._conn.send(("log", record.levelno, record.name, record.getMessage()))
        except Exception:  # noqa: BLE001 - logging must never break the worker
            pass


def _worker_main(conn: Any, cancel_id: Any, path: str, load_kwargs: dict[str, Any]) -> None:
    """The worker process: load once, then serve jobs until told to stop or the pipe closes."""
    lock = threading.Lock()
    logger = logging.getLogger("ptycho_runtime")
    logger.setLevel(logging.DEBUG)  # everything goes to the parent, whose logger levels decide what is shown
    logger.addHandler(_LogForwarder(conn, lock))
    logger.propagate = False

    def send(*msg: Any) -> None:
        with lock:
            conn.send(msg)

    try:
        from ..inference.bundle import load_bundle
        from ..reconstruction.compiled import available_kernels

        t0 = time.perf_counter()
        bundle = load_bundle(path, **load_kwargs)
        available_kernels()  # numba's compiled loops where installed (≈ 0.6 s): loaded with the bundle, not in a job
        send("ready", bundle.info(), time.perf_counter() - t0, os.getpid())
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        send("error", -1, *_pack(exc))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent has gone
        if msg[0] == "stop":
            return
        _, job, args, kwargs, snapshots = msg

        def on_batch(done: int, total: int, snapshot: Any, job: int = job, snapshots: bool = snapshots) -> None:
            send("progress", job, done, total, snapshot() if snapshots else None, "inference")

        def on_sweep(done: int, total: int, job: int = job) -> None:
            send("progress", job, done, total, None, "refinement")

        t0 = time.perf_counter()
        try:
            if kwargs.get("refine") is not None:
                kwargs = {**kwargs, "refine": _worker_settings(kwargs["refine"], on_sweep)}
            rec = bundle.reconstruct(*args, **kwargs, on_batch=on_batch, cancel=lambda job=job: cancel_id.value == job)
            send("result", job, rec, time.perf_counter() - t0)
        except BaseException as exc:  # noqa: BLE001
            send("error", job, *_pack(exc))


ExceptionSpec = tuple[str, str, tuple]  # (module, class name, args): how the parent rebuilds an error


def _pack(exc: BaseException) -> tuple[Optional[ExceptionSpec], str, str]:
    """An error as plain data: its class (module, name) and its plain arguments, plus the traceback text.

    No pickled objects cross back: the parent rebuilds only the runtime's
    own and Python's built-in exception types (``_rebuild``).
    """
    cls = type(exc)
    plain = all(isinstance(a, (str, int, float, bool, type(None))) for a in exc.args)
    spec = (cls.__module__, cls.__qualname__, tuple(exc.args)) if plain else None
    return spec, cls.__name__, "".join(traceback.format_exception(cls, exc, exc.__traceback__))


def _rebuild(spec: ExceptionSpec) -> Optional[BaseException]:
    """The exception ``spec`` names, if it is a built-in or a ``ptycho_runtime`` type that takes its args; else None."""
    module, name, args = spec
    if module == "builtins":
        cls = getattr(builtins, name, None)
    elif module == "ptycho_runtime" or module.startswith("ptycho_runtime."):
        try:
            cls = importlib.import_module(module)
            for part in name.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError):
            return None
    else:
        return None
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        return None
    try:
        return cls(*args)
    except Exception:  # noqa: BLE001 - a constructor with another signature: the parent reports it as text
        return None


class BundleWorker:
    """One bundle, loaded once in a ``spawn``ed process, reconstructing on request. Use as a context manager.

    ``load_bundle`` options (``device``, ``backend``, ``precision``,
    ``intra_op_threads``, ...) are passed to the worker. ``start()`` (or the
    first call) starts it and waits until the bundle is loaded; bundle errors
    are raised as their own ``BundleError`` types. Calls are serialised (one
    job at a time); a ``BundleWorker`` may be shared by threads.
    """

    def __init__(self, path: Union[str, os.PathLike], *, start_timeout_s: float = 300.0, **load_kwargs: Any) -> None:
        self.path = os.fspath(path)
        self.load_kwargs = dict(load_kwargs)
        self.start_timeout_s = float(start_timeout_s)
        self.info: Any = None
        self.load_seconds: Optional[float] = None
        self.pid: Optional[int] = None
        self.starts = 0
        self._proc: Any = None
        self._conn: Any = None
        self._cancel: Any = None
        self._jobs = itertools.count(1)
        self._job: Optional[int] = None
        self._lock = threading.Lock()
        self._finalizer: Any = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def start(self) -> "BundleWorker":
        """Start the worker (if it is not running) and wait until its bundle is loaded."""
        with self._lock:
            self._start_locked()
        return self

    def _start_locked(self) -> None:
        if self.alive:
            return
        self._stop_locked()
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._cancel = ctx.Value("q", 0, lock=False)
        proc = ctx.Process(target=_worker_main, name="ptycho-runtime-worker", daemon=True,
                           args=(child, self._cancel, self.path, self.load_kwargs))
        t0 = time.perf_counter()
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        self._finalizer = weakref.finalize(self, _terminate, proc, parent)
        self.starts += 1
        msg = self._receive(None, deadline=time.monotonic() + self.start_timeout_s)
        if msg[0] == "error":
            self._stop_locked()
            _raise(msg)
        _, self.info, self.load_seconds, self.pid = msg
        log.info("worker %d loaded %s in %.2f s (started in %.2f s): %s on %s", self.pid, self.path,
                 self.load_seconds, time.perf_counter() - t0, self.info.backend, self.info.device)

    def close(self) -> None:
        """Stop the worker (it is also stopped when this object is garbage-collected or the host exits)."""
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._proc = self._conn = self._finalizer = None

    def __enter__(self) -> "BundleWorker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ calls

    def reconstruct(self, diffraction: np.ndarray, positions: np.ndarray, **kwargs: Any) -> Reconstruction:
        """``Bundle.reconstruct`` in the worker (same arguments, except the callbacks); blocks until done."""
        for event in self.run(diffraction, positions, snapshots=False, **kwargs):
            if isinstance(event, Done):
                return event.reconstruction
        raise WorkerError("the worker ended the call without a result")  # pragma: no cover - run() raises first

    def run(self, diffraction: np.ndarray, positions: np.ndarray, *, snapshots: bool = True,
            **kwargs: Any) -> Iterator[Union[Progress, Done]]:
        """``Bundle.reconstruct`` in the worker, as events: ``Progress`` after each micro-batch (and, with
        ``refine=``, each sweep), then ``Done``.

        Closing the iterator early (``break``, ``close()``) cancels the call
        between micro-batches (and sweeps); so does ``cancel()`` from another thread, which
        makes the iterator raise ``ReconstructionCancelled`` (``RefinementCancelled`` during the sweeps). Errors are
        re-raised as their own types (``ValueError`` for bad input, ...).
        """
        for bad in ("progress", "on_batch", "cancel"):
            if bad in kwargs:
                raise TypeError(f"{bad} is not available through a worker: iterate over run() for progress and "
                                "close the iterator (or call cancel()) to cancel")
        if "refine" in kwargs:
            kwargs = {**kwargs, "refine": plain_refine(kwargs["refine"])}
        with self._lock:
            self._report_death_locked()
            self._start_locked()
            job = next(self._jobs)
            self._job = job
            try:
                self._conn.send(("job", job, (diffraction, positions), kwargs, snapshots))
            except (OSError, EOFError, BrokenPipeError):
                self._stop_locked()
                raise WorkerError(f"the worker for {self.path} has stopped; the next call starts a new one") from None
            finished = False
            try:
                while True:
                    msg = self._receive(job)
                    if msg[0] == "progress":
                        yield Progress(msg[2], msg[3], msg[4], msg[5])
                    elif msg[0] == "result":
                        finished = True
                        yield Done(msg[2], msg[3])
                        return
                    else:
                        finished = True
                        _raise(msg)
            finally:
                self._job = None
                if not finished and self.alive:  # closed early: cancel, and drain the job off the pipe
                    self._cancel.value = job
                    try:
                        while self._receive(job)[0] == "progress":
                            pass
                    except Exception:  # noqa: BLE001 - the cancelled job's own ending is not news
                        pass

    def _report_death_locked(self) -> None:
        """Raise WorkerError if the worker died since the last call (and forget it, so the next call starts one).

        Without this, a worker that died between calls would be restarted without a word, or the death reported,
        depending on whether the parent had seen the exit yet: a host must learn of a crash (out of memory, killed)
        the same way every time.
        """
        if self._proc is not None and not self._proc.is_alive():
            code = self._proc.exitcode
            self._stop_locked()
            raise WorkerError(f"the worker for {self.path} died (exit code {code}); the next call starts a new one")

    def cancel(self) -> None:
        """Cancel the running call (if any) at its next micro-batch boundary."""
        job = self._job
        if job is not None and self._cancel is not None:
            self._cancel.value = job

    def _receive(self, job: Optional[int], deadline: Optional[float] = None) -> tuple:
        """The next message of ``job`` (log records re-emitted on the way); WorkerError if the worker dies."""
        while True:
            try:
                ready = self._conn.poll(_POLL_S)
                msg = self._conn.recv() if ready else None
            except (EOFError, OSError):
                msg, ready = None, True
            if msg is not None:
                if msg[0] == "log":
                    logging.getLogger(msg[2]).log(msg[1], "[worker] %s", msg[3])
                    continue
                if job is None or msg[1] == job or msg[0] == "ready":
                    return msg
                continue  # a message of an earlier, abandoned job
            if ready or not self._proc.is_alive():
                code = self._proc.exitcode
                self._stop_locked()
                raise WorkerError(f"the worker for {self.path} died (exit code {code}); the next call starts a "
                                  "new one")
            if deadline is not None and time.monotonic() > deadline:
                self._stop_locked()
                raise WorkerError(f"the worker did not load {self.path} within {self.start_timeout_s:g} s")


def _raise(msg: tuple) -> None:
    _, _, spec, name, text = msg
    exc = _rebuild(spec) if spec is not None else None
    if exc is None:
        raise WorkerError(f"the worker raised {name}:\n{text}")
    log.debug("worker traceback:\n%s", text)
    raise exc


def _terminate(proc: Any, conn: Any) -> None:
    """Ask the worker to stop, then make sure it has (finalizer: runs at close, collection or exit)."""
    try:
        conn.send(("stop",))
    except Exception:  # noqa: BLE001
        pass
    proc.join(5.0)
    if proc.is_alive():
        proc.terminate()
        proc.join(5.0)
    if proc.is_alive():
        proc.kill()
        proc.join()
    try:
        conn.close()
    except Exception:  # noqa: BLE001
        pass
