"""``read_bundle`` and ``check_bundle_file``: libhdf5 parses a stranger's file in a child process first.

Why: libhdf5 is C and follows the file's own metadata. A bundle whose
global heap (where variable-length strings live; it has no checksum in any
HDF5 version) has a zeroed object header sends it into a loop that no Python
code can interrupt: random fuzzing of a real bundle found one such file in
250. Crafted files have crashed it too (its CVE list is long). The reader
policy cannot help from inside the loop, so the parse runs in a long-lived
child (``format.parser_process``, started on first use, one per process) under a
time limit (``PARSE_SECONDS`` plus one second per ``PARSE_BYTES_PER_SECOND``
of file), a memory limit (``PARSE_MEMORY_FACTOR`` × the file + 1 GiB) and a
CPU-time limit (2 × the time limit + 10 s: should this process die while
libhdf5 loops, the child still ends).
Past either, the child is killed and the caller gets a ``BundleFormatError``;
the next read starts a fresh child (≈ 0.5 s). The result comes back as JSON
and raw array bytes (``format.wire``), never pickled. A forked process
starts its own child instead of sharing its parent's.

``check_in_parser`` runs another library's reader there first (ptychodus's
HDF5 files), under the same time limit and ¾ of the available memory.
``PTYCHO_RUNTIME_PARSE_SECONDS`` in the environment replaces the base time
limit (a host that must fail faster on a damaged file; the hostile tests).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .contents import BundleContents
from .errors import BundleFormatError, BundleParserUnavailableError, fix_damaged, resolve_bundle_path
from .wire import WireError, decode_contents, decode_error, read_frame

PARSE_SECONDS = 20.0
PARSE_BYTES_PER_SECOND = 50e6
PARSE_MEMORY_FACTOR = 3
START_SECONDS = 120.0
PARSE_SECONDS_ENV = "PTYCHO_RUNTIME_PARSE_SECONDS"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def read_bundle(path: str | os.PathLike, *, time_limit_s: Optional[float] = None) -> BundleContents:
    """Open a bundle under the reader policy; return its verified contents in memory.

    Order (in the parsing process): regular-file check, HDF5 magic, header, a
    walk of the whole tree by schema (links, storage, filters, dtypes,
    declared sizes) *before* any payload is read, then every payload read and
    checksum-verified, then params, weights and graph metadata checked
    against each other. ``time_limit_s`` replaces the size-based limit.
    Raises only ``BundleError`` subclasses.
    """
    p = resolve_bundle_path(path)
    header, arrays = _ask("read", p, time_limit_s)
    try:
        return decode_contents(header.get("contents"), arrays, p)
    except (WireError, RecursionError, TypeError, ValueError):
        raise _malformed_answer(p) from None


def check_bundle_file(path: str | os.PathLike, *, time_limit_s: Optional[float] = None) -> Path:
    """Fail fast on anything that is not a bundle: a regular HDF5 file with this format's header.

    Reads no payload (milliseconds once the parsing process runs), so commands
    can refuse a wrong file before importing torch or onnx; ``read_bundle``
    still checks everything else. Returns the resolved path; raises only
    ``BundleError`` subclasses.
    """
    p = resolve_bundle_path(path)
    _ask("check", p, time_limit_s)
    return p


def close_parser() -> None:
    """Stop this process's parsing process now (a host shutting down); the next read starts a new one."""
    global _parser
    with _lock:
        if _parser is not None:
            _parser.stop()
            _parser = None


# --------------------------------------------------------------------------- the child


class _Parser:
    """One ``format.parser_process`` process and its pipes; used under ``_lock``, one request at a time."""

    def __init__(self) -> None:
        if getattr(sys, "frozen", False):  # sys.executable is the application itself, not a Python
            raise BundleParserUnavailableError(_unavailable("this is a frozen application, whose executable "
                                                            "cannot run Python code"), None)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        code = (f"import sys; sys.path[:] = [{_PACKAGE_ROOT!r}] + [p for p in sys.path if p not in ('', '.')]; "
                "from ptycho_runtime.format.parser_process import main; main()")
        flags = ["-P"] if sys.version_info >= (3, 11) else []  # -P: the working directory is not on sys.path
        try:  # unbuffered pipes: no buffer a fork could copy and send twice, no lock a fork could inherit held
            self.proc = subprocess.Popen([sys.executable, *flags, "-c", code], bufsize=0, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        except OSError as exc:
            raise BundleParserUnavailableError(_unavailable(f"{sys.executable} did not start: {exc.strerror}"),
                                               None) from None
        outcome = self._receive(START_SECONDS, 0, 2**20)
        if not (isinstance(outcome, tuple) and outcome[0].get("ready")):
            self.stop()
            why = (f"it did not answer within {START_SECONDS:.0f} s" if outcome == "timeout" else
                   f"it exited before it was ready (does {sys.executable} import ptycho_runtime?)")
            raise BundleParserUnavailableError(_unavailable(why), None)

    def ask(self, request: dict[str, Any], limit_s: float, max_array_bytes: int, max_header_bytes: int) -> Any:
        """Send one request; → (header, arrays), or "timeout", or the exception that ended the answer."""
        try:
            data = memoryview(json.dumps(request).encode() + b"\n")
            while data:
                data = data[self.proc.stdin.write(data):]
        except OSError as exc:
            return exc
        return self._receive(limit_s, max_array_bytes, max_header_bytes)

    def _receive(self, limit_s: float, max_array_bytes: int, max_header_bytes: int) -> Any:
        box: list[Any] = []

        def receive() -> None:
            try:
                box.append(read_frame(self.proc.stdout, max_array_bytes, max_header_bytes))
            except Exception as exc:  # noqa: BLE001 - EOF (the child died), a malformed frame, an OS error
                box.append(exc)

        reader = threading.Thread(target=receive, name="ptycho-bundle-parser", daemon=True)
        reader.start()
        reader.join(min(limit_s, threading.TIMEOUT_MAX))
        if reader.is_alive():
            self.stop()  # the child's end of the pipe closes: the thread ends too
            reader.join(5.0)  # unless another process holds that end; then the (daemon) thread is left behind
            return "timeout"
        return box[0]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        _close_pipes(self.proc)


def _close_pipes(proc: subprocess.Popen) -> None:
    for pipe in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            pipe.close()


_lock = threading.Lock()
_parser: Optional[_Parser] = None


def _forget_parser_after_fork() -> None:
    """In a forked child: drop the parent's parser (closing only this process's copies of its pipes)."""
    global _lock, _parser
    if _parser is not None:
        _close_pipes(_parser.proc)
        _parser.proc.returncode = 0  # not ours to wait for
    _lock, _parser = threading.Lock(), None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parser_after_fork)


def check_in_parser(target: str, paths: Sequence[str | os.PathLike], *,
                    time_limit_s: Optional[float] = None) -> None:
    """Run a reader that is not ours (``"module:function"``, called with ``paths``) in the parsing process first.

    For files from strangers that another library parses with libhdf5 in this
    process (ptychodus's product and diffraction files): libhdf5 parses the
    same bytes the same way, so when the child finishes within the limit, the
    caller's own parse will too (if the files do not change in between), and
    a loop, a crash or an allocation past ¾ of the available memory ends in
    the child instead. Raises what the reader raised there
    (``FileNotFoundError`` or ``ValueError``, same message), or a
    ``ValueError`` naming the files on a timeout or crash.
    """
    sizes = []
    for path in paths:
        try:
            sizes.append(os.stat(path).st_size)
        except OSError:
            sizes.append(0)
    named = " and ".join(str(p) for p in paths)
    limit = _limit(time_limit_s, sum(sizes))
    available = available_memory()
    memory = int(0.75 * available) if available is not None else PARSE_MEMORY_FACTOR * sum(sizes) + 2**30
    outcome, code = _exchange({"op": "call", "target": target, "paths": [os.fspath(p) for p in paths],
                               "memory_bytes": memory}, limit, 0, 2**20)
    problem = _failure(outcome, code, limit, named)
    if problem is not None:
        raise ValueError(f"{problem}; a file is damaged or crafted (on a machine too busy to parse it in time, "
                         f"raise {PARSE_SECONDS_ENV})")
    header = outcome[0]
    if header.get("ok") is not True:
        message = header.get("message") if isinstance(header.get("message"), str) else f"{named} is unreadable"
        raise (FileNotFoundError if header.get("error") == "FileNotFoundError" else ValueError)(message)


_CGROUP_MEMORY = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2, then v1
                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate: the least of MemAvailable, a container's (cgroup's) headroom and
    the headroom under an address-space limit (Linux). None where none can be read.
    """
    found = []
    for limit_file, usage_file in _CGROUP_MEMORY:
        try:
            with open(limit_file) as fh:
                limit = fh.read().strip()
            if limit.isdigit() and int(limit) < 2**60:  # "max" (v2) or a huge number (v1): no limit
                with open(usage_file) as fh:
                    found.append(int(limit) - int(fh.read().strip()))
                break
        except (OSError, ValueError):
            continue
    try:
        with open("/proc/meminfo") as fh:
            found += [int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:")]
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as fh:
                found.append(soft - int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError, ImportError):
        pass
    return min(found) if found else None


def _ask(op: str, p: Path, time_limit_s: Optional[float]) -> tuple[dict[str, Any], list[np.ndarray]]:
    """One bundle request to the parsing process; its ``BundleError`` re-raised here, a timeout or crash as one."""
    try:
        size = p.stat().st_size
    except OSError:
        size = 0  # the parser reports what is wrong with it
    limit = _limit(time_limit_s, size)
    request = {"op": op, "path": str(p), "memory_bytes": PARSE_MEMORY_FACTOR * size + 2**30}
    # the JSON documents come from the file (escaping at most sextuples a byte); the arrays are its datasets
    outcome, code = _exchange(request, limit, 2 * size + 2**20, 6 * size + 2**20)
    problem = _failure(outcome, code, limit, f"{p} ({size / 1e6:.1f} MB)")
    if problem is not None:
        raise BundleFormatError(f"{problem}; the file is damaged or crafted. {fix_damaged(p)} (On a machine too "
                                f"busy to parse it in time, raise {PARSE_SECONDS_ENV}.)", p)
    header, arrays = outcome
    if header.get("ok") is not True:
        raise decode_error(header)
    return header, arrays


def _exchange(request: dict[str, Any], limit: float, max_array_bytes: int,
              max_header_bytes: int) -> tuple[Any, Optional[int]]:
    """One request → (the answer, or "timeout", or the exception that ended it; a dead child's exit code).

    The caller's working directory travels with it: the child opens paths as given. The child also gets a
    CPU-time limit past the wall-clock one, so it ends by itself should this process die while it loops.
    """
    global _parser
    request = {**request, "cpu_seconds": 2 * limit + 10}
    try:
        request = {**request, "cwd": os.getcwd()}
    except OSError:  # no working directory: paths as absolute ones
        request = {**request, "cwd": None,
                   **({"path": os.path.abspath(request["path"])} if "path" in request else {}),
                   **({"paths": [os.path.abspath(q) for q in request["paths"]]} if "paths" in request else {})}
    code = None
    with _lock:
        for _attempt in range(2):  # a second time only if the child had died since the last request
            if _parser is not None and _parser.proc.poll() is not None:  # died since the last request
                _parser.stop()
                _parser = None
            if _parser is None:
                _parser = _Parser()
            try:
                outcome = _parser.ask(request, limit, max_array_bytes, max_header_bytes)
            except BaseException:  # KeyboardInterrupt mid-answer: the rest of it must never be read as the next
                _parser.stop()
                _parser = None
                raise
            if isinstance(outcome, tuple):
                break
            dead, _parser = _parser, None
            if outcome != "timeout":
                dead.stop()
            code = dead.proc.returncode
            if not isinstance(outcome, OSError):
                break
    return outcome, code


def _failure(outcome: Any, code: Optional[int], limit: float, named: str) -> Optional[str]:
    """What went wrong with an answer, as the start of a message (None: it is an answer to read).

    A pipe that failed on both attempts is this host's problem, not the file's: BundleParserUnavailableError.
    """
    if isinstance(outcome, tuple):
        return None
    if isinstance(outcome, OSError):
        why = f"a request to it failed twice ({outcome.strerror or outcome})"
        raise BundleParserUnavailableError(_unavailable(why), None)
    if outcome == "timeout":
        return f"parsing {named} took longer than {limit:.0f} s: the HDF5 library loops on it"
    if isinstance(outcome, EOFError):
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"the HDF5 library crashed while parsing {named} ({how})"
    return f"the process that parses {named} returned a malformed answer"


def _limit(time_limit_s: Optional[float], size: int) -> float:
    """The wall-clock limit: the caller's, else the base (``PARSE_SECONDS`` or the environment's) + the size's."""
    if time_limit_s is None:
        try:
            base = float(os.environ.get(PARSE_SECONDS_ENV, PARSE_SECONDS))
        except ValueError:
            base = PARSE_SECONDS
        base = base if math.isfinite(base) and base > 0 else PARSE_SECONDS
        return base + size / PARSE_BYTES_PER_SECOND
    if not time_limit_s > 0:  # also NaN
        raise ValueError(f"time_limit_s must be a number of seconds > 0 (got {time_limit_s!r})")
    return min(float(time_limit_s), 1e9)  # infinity: as good as none


def _malformed_answer(p: Path) -> BundleFormatError:
    return BundleFormatError(f"{p}: the process that parses bundles returned a malformed answer; the file is "
                             f"damaged or crafted. {fix_damaged(p)}", p)


def _unavailable(why: str) -> str:
    return (f"ptycho-runtime could not start the process that parses bundles: {why}. Bundles are parsed in a "
            "child process so that a damaged or crafted file cannot hang or crash this one; run from an "
            "environment whose Python can start subprocesses.")
