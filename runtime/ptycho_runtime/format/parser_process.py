"""The bundle-parsing process: reads requests on stdin, parses each file with libhdf5 here, answers in frames.

Started by ``format.isolated`` (``python -c "from ptycho_runtime.format.parser_process
import main; main()"``) and nothing else. A damaged or crafted file can make
libhdf5 loop or crash; here that costs only this process, which the caller
kills after its time limit. Each request runs under an address-space limit
(Linux) so a declared size cannot exhaust the host's memory either. The
protocol's stdout is a private copy of descriptor 1; descriptor 1 itself
goes to stderr, so nothing a library prints can corrupt a frame.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import signal
import sys
from typing import Any, Iterator

from .errors import BundleError, BundleFormatError, BundleNotFoundError, fix_damaged
from .reader import check_bundle_file_in_process, read_bundle_in_process
from .wire import encode_contents, encode_error, write_frame


def main() -> None:
    """Serve requests until stdin closes (the caller exited or closed the parser)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the caller; it stops this process
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    write_frame(out, {"ok": True, "ready": os.getpid()})
    for line in sys.stdin.buffer:
        request = json.loads(line)
        header, arrays = _answer(request)
        write_frame(out, header, arrays)
        del header, arrays
        gc.collect()


def _answer(request: dict[str, Any]) -> tuple[dict[str, Any], list]:
    try:
        if request["cwd"] is not None:
            os.chdir(request["cwd"])
    except OSError as exc:
        message = f"Cannot use the caller's working directory {request['cwd']} ({exc.strerror})."
        if request["op"] == "call":
            return {"ok": False, "error": "FileNotFoundError", "message": message}, []
        return encode_error(BundleNotFoundError(message, request.get("path"))), []
    if request["op"] == "call":
        return _call(request)
    path = request["path"]
    try:
        with _limits(int(request["memory_bytes"]), float(request["cpu_seconds"])):
            if request["op"] == "check":
                check_bundle_file_in_process(path)
                return {"ok": True}, []
            body, arrays = encode_contents(read_bundle_in_process(path))
            return {"ok": True, "contents": body}, arrays
    except BundleError as exc:
        return encode_error(exc), []
    except Exception as exc:  # noqa: BLE001 - MemoryError past the limit, or anything the reader did not wrap
        return encode_error(BundleFormatError(
            f"{path} could not be parsed ({type(exc).__name__}); it is damaged, or declares more than it holds. "
            f"{fix_damaged(path)}", path)), []


def _call(request: dict[str, Any]) -> tuple[dict[str, Any], list]:
    """Another library's reader (``format.isolated.check_in_parser``): only whether it raised, and what."""
    module, _, name = request["target"].partition(":")
    try:
        reader = getattr(importlib.import_module(module), name)
        with _limits(int(request["memory_bytes"]), float(request["cpu_seconds"])):
            reader(*request["paths"])
        return {"ok": True}, []
    except FileNotFoundError as exc:
        return {"ok": False, "error": "FileNotFoundError", "message": str(exc)}, []
    except ValueError as exc:
        return {"ok": False, "error": "ValueError", "message": str(exc)}, []
    except Exception as exc:  # noqa: BLE001 - MemoryError past the limit, or what the reader did not expect
        named = " and ".join(request["paths"])
        return {"ok": False, "error": "ValueError",
                "message": f"{named} could not be read ({type(exc).__name__}); a file is damaged, or declares "
                           "more than this machine's memory"}, []


@contextlib.contextmanager
def _limits(extra_bytes: int, cpu_seconds: float) -> Iterator[None]:
    """While parsing: at most ``extra_bytes`` more address space than now, and ``cpu_seconds`` more CPU time.

    Linux (address space) and POSIX (CPU); elsewhere no limit. Past the CPU
    time the kernel ends this process (SIGXCPU): the caller kills it sooner,
    so that only matters once the caller itself has died.
    """
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        saved = {which: resource.getrlimit(which) for which in (resource.RLIMIT_AS, resource.RLIMIT_CPU)}
    except (ImportError, OSError, ValueError):
        yield
        return
    used = resource.getrusage(resource.RUSAGE_SELF)
    wanted = {resource.RLIMIT_AS: current + extra_bytes,
              resource.RLIMIT_CPU: int(used.ru_utime + used.ru_stime + cpu_seconds) + 1}
    for which, limit in wanted.items():
        soft, hard = saved[which]
        for bound in (soft, hard):
            if bound != resource.RLIM_INFINITY:
                limit = min(limit, bound)
        resource.setrlimit(which, (limit, hard))
    try:
        yield
    finally:
        for which, bounds in saved.items():
            resource.setrlimit(which, bounds)
