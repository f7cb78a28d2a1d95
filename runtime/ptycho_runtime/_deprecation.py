"""The old flat module paths (``ptycho_runtime.bundle``, ``.stitching``, ...) as deprecated aliases.

The runtime was reorganised into sub-packages by job (docs/architecture.md).
For one release every old module path keeps working: its module file is a
shim that warns once, on first import, naming the new path, and then either
*is* the new module (``alias``: ``sys.modules`` points the old name at it, so
``monkeypatch``, ``isinstance`` and module attributes behave exactly as
before) or, where one old module was split into several, re-exports their
names. Nothing inside the runtime imports a shim (tests/test_architecture.py).
"""

from __future__ import annotations

import importlib
import sys
import warnings

REMOVED_IN = "the next release"


def _importer() -> str:
    """The module that triggered the import: the first frame outside the runtime and importlib's bootstrap."""
    frame = sys._getframe(1)
    while frame is not None:
        g = frame.f_globals
        name = getattr(g.get("__spec__"), "name", None) or g.get("__name__", "")  # ``python -m x``: x, not __main__
        if not (name.startswith("ptycho_runtime") or "importlib._bootstrap" in name
                or "_bootstrap" in frame.f_code.co_filename):
            return name
        frame = frame.f_back
    return ""


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    """One ``DeprecationWarning`` for code that imported ``old``, pointing at the importer's line.

    Called from a shim's top level (importlib's own frames are skipped by ``warnings``). When the importer
    is ``ptycho_export`` (released with the runtime, migrated with it), the warning is attributed to this
    module instead: still raised (pytest and ``-W error`` see it), but never printed on a user's stderr by
    Python's default filters, which show DeprecationWarnings only for code run as ``__main__``.
    """
    if _importer().split(".")[0] == "ptycho_export":
        stacklevel = 1
    warnings.warn(f"{old} is deprecated: import it from {new} instead ({old} goes away in {REMOVED_IN})",
                  DeprecationWarning, stacklevel=stacklevel)


def alias(old: str, new: str) -> None:
    """Make the module ``old`` (being imported) the module ``new``, after one deprecation warning."""
    warn_moved(old, new, stacklevel=4)
    sys.modules[old] = importlib.import_module(new)
