"""The ``ptycho-runtime`` command (console script ``ptycho_runtime.cli:main``).

``main`` parses and maps errors to exit codes (``cli.main``); each
subcommand's work is a function callable without argv: ``infer.run_infer``,
``infer.run_infer_ptychodus``, ``info.bundle_report``, and the library calls
``cli.cluster`` wraps (``write_model_repository``, ``serve``, ``infer_many``).
The CLI is the top layer: nothing in the runtime imports it.

``write_png`` and ``write_reconstruction`` used to live here; they are
``ptycho_runtime.files`` now, and the old names still work for one release
with a ``DeprecationWarning``.
"""

from __future__ import annotations

from typing import Any

from .common import (
    EPILOG,
    EXIT_BAD_INPUT,
    EXIT_CHECKSUM,
    EXIT_OK,
    EXIT_REMOTE,
    EXIT_SCANS_FAILED,
    EXIT_UNEXPECTED,
    UsageError,
    add_scan_arguments,
)
from .info import bundle_report
from .main import build_parser, main
from .progress import Progress

__all__ = ["EPILOG", "EXIT_BAD_INPUT", "EXIT_CHECKSUM", "EXIT_OK", "EXIT_REMOTE", "EXIT_SCANS_FAILED",
           "EXIT_UNEXPECTED", "Progress", "UsageError", "add_scan_arguments", "build_parser", "bundle_report", "main"]


def _write_reconstruction_from_bundle(path: Any, recon: Any, positions: Any, bundle: Any,
                                      patterns_per_second: float, elapsed_s: float, scan_path: str) -> None:
    """The old signature (a ``Bundle`` where ``files.write_reconstruction`` takes a ``Provenance``)."""
    from ..files.reconstruction_file import Provenance, write_reconstruction

    write_reconstruction(path, recon, positions, Provenance.of(bundle), patterns_per_second, elapsed_s, scan_path)


def __getattr__(name: str) -> Any:
    """The names that moved to ``ptycho_runtime.files``, with a ``DeprecationWarning`` (PEP 562)."""
    from .._deprecation import warn_moved
    from ..files import png

    moved = {"write_png": (png.write_png, "ptycho_runtime.files.write_png"),
             "PNG_HINT": (png.PNG_HINT, "ptycho_runtime.files.png.PNG_HINT"),
             "write_reconstruction": (_write_reconstruction_from_bundle,
                                      "ptycho_runtime.files.write_reconstruction (it takes a files.Provenance)")}
    if name not in moved:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value, new = moved[name]
    warn_moved(f"ptycho_runtime.cli.{name}", new)
    globals()[name] = value  # one warning per name
    return value
