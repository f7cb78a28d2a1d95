"""The runtime's compiled loops (numba): the refinement's batch step and fits, and the stitching's splat.

Why: a numpy batch step, after its two FFTs, is some twenty passes over the
batch's [B, N, N] arrays (the bilinear read, the probe multiply, the modulus
projection, the gain, the bilinear spread, the windows' copies), each a
separate ufunc call; on a 1,000-frame sweep at N = 64 they took ≈ 51 of its
≈ 78 ms (profiled), and two Python threads could not share them (the glue
between the calls holds the GIL). The loops (``compiled_loops``) do them in
one pass each, reading and writing the canvas in place; where rocket-fft
gives numba numpy's FFT, a whole batch step, FFTs included, is one parallel
call (``refinement.numba_backend``), as are the slow-phase fit's local ramps
(``refinement.phase_field``). The stitching's splat (``stitching``) is one
more. Each loop computes what its numpy counterpart computes, term for term,
so they agree to rounding; numpy stays the reference, and the path where
numba is absent.

numba is optional (``pip install ptycho-runtime[fast]``). The loops are
compiled once per machine (≈ 10 s) and cached on disk by numba; a process
then loads numba and the cached loops in ≈ 0.6 s, which ``load_kernels``
spends ahead where a host wants it out of its first reconstruction
(``refinement.engine.prepare_backend``).
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace
from typing import Optional

import numpy as np

_KERNELS: Optional[SimpleNamespace] = None
KERNELS = ("read_waves", "project", "correct", "spread", "probe_sums", "ramp_sums", "splat", "batch_step",
           "ramp_step")
"""What ``compiled_loops`` defines (``batch_step`` and ``ramp_step``, which transform inside numba, are None there
without rocket-fft)."""


def numba_available() -> bool:
    """Whether numba can be imported here (without importing it: ``backend="auto"`` asks this on every refinement).

    rocket-fft (numpy's FFT inside numba, the [fast] extra's third package)
    is optional on top: without it the batch step's FFTs are scipy's, between
    the compiled loops (``compiled_loops.batch_step``)."""
    return importlib.util.find_spec("numba") is not None


def default_threads() -> int:
    """Threads for the parallel loops: one per core this process may use, 2 at most (measured on 2; a batch of a
    dozen frames has little more to split)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(2, cores))


def load_kernels() -> SimpleNamespace:
    """Import numba and compile (or load from its cache) the kernels, once per process; raises ImportError
    without numba.

    A host calls this at start-up to keep numba's import and the kernels'
    loading (≈ 0.6 s with a warm cache) out of its first reconstruction.
    Where numba cannot write its cache (a read-only install with no user
    cache directory: numba's RuntimeError) the callers read with numpy
    (``available_kernels``, ``refinement.engine.make_backend``).
    """
    global _KERNELS
    if _KERNELS is None:
        from . import compiled_loops as loops  # imports numba; numba raises RuntimeError where it cannot cache

        kernels = SimpleNamespace(**{name: getattr(loops, name) for name in KERNELS})
        _warm(kernels)
        _KERNELS = kernels
    return _KERNELS


def _after_fork_in_child() -> None:
    """A forked child must not start numba's parallel loops: GNU OpenMP's threads do not survive a fork (numba
    aborts the child). It keeps the serial loops, with scipy's FFTs between them (the same numbers)."""
    if _KERNELS is not None:
        _KERNELS.batch_step = _KERNELS.ramp_step = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def available_kernels() -> Optional[SimpleNamespace]:
    """The kernels where numba is installed and they load, else None (the caller then runs its numpy code).

    A broken numba is not an error here (``refinement.engine.make_backend``
    warns about it where a backend was asked for).
    """
    if not numba_available():
        return None
    try:
        return load_kernels()
    except Exception:  # noqa: BLE001 - numba's errors (typing, LLVM) share no narrower base
        return None


def _warm(k: SimpleNamespace) -> None:
    """Call each kernel once on a tiny input: compiles it (or loads it from the cache) now, not mid-sweep."""
    canvas = np.zeros((6, 12), np.float32)
    probe = np.ones((4, 8), np.float32)
    rows, cols = np.zeros(1, np.int64), np.zeros(1, np.int64)
    f = np.zeros(1, np.float32)
    waves = np.zeros((1, 4, 8), np.float32)
    k.read_waves(canvas, probe, rows, cols, f, f, waves, waves, True)
    k.project(waves.reshape(-1), np.zeros(16, np.float32), np.float32(1.0), np.float32(1e-20))
    k.correct(probe, waves)
    k.spread(canvas, waves, rows, cols, f, f)
    k.probe_sums(waves, waves, probe.copy(), np.zeros((4, 4), np.float32))
    k.splat(np.zeros((6, 6)), np.zeros((6, 6)), np.zeros((6, 6)), waves, np.ones((4, 4)), rows, cols, np.zeros(1),
            np.zeros(1))
    if k.batch_step is not None:
        k.batch_step(canvas, probe, probe, rows, cols, f, f, np.zeros((1, 4, 4), np.float32), np.float32(1.0),
                     np.float32(1e-20), 1, False, waves[:0], waves[:0])
        import numba

        if numba.threading_layer() == "workqueue":  # not thread-safe: a host refining in two threads would abort
            k.batch_step = k.ramp_step = None
    if k.ramp_step is not None:
        k.ramp_step(canvas, probe, rows, cols, f, f, np.zeros((1, 4, 4), np.float32), np.zeros(4, np.float32), 1,
                    np.zeros((1, 2)), np.zeros((1, 2, 2)), np.zeros(1))
    k.ramp_sums(waves, waves, waves, np.zeros((1, 4, 4), np.float32), np.float32(4), np.zeros((1, 2)),
                np.zeros((1, 2, 2)), np.zeros(1))


