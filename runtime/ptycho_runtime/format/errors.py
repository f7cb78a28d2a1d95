"""The errors every bundle reader raises: ``BundleError`` and its subclasses, each naming the fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from .schema import BUNDLE_FILENAME


class BundleError(ValueError):
    """Base of every error a bundle reader raises (a ValueError: the input is bad, not the program).

    ``path`` is the bundle, ``dataset`` the HDF5 path inside it (or None).
    """

    def __init__(self, message: str, path: Any = None, dataset: Optional[str] = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.dataset = dataset


class BundleFormatError(BundleError):
    """The file is not a readable bundle of a version this package understands."""


class BundleNotFoundError(BundleFormatError, FileNotFoundError):
    """No bundle at the given path (also a FileNotFoundError, as before)."""


class BundleUnsafeError(BundleFormatError):
    """The file tries to reach outside itself or to run something it must not (links, external data, ops)."""


class BundleLimitError(BundleFormatError):
    """A declared size exceeds what the schema allows or what the file holds."""


class BundleParamsError(BundleFormatError):
    """Params are missing, of the wrong type, out of range, or disagree with the graphs or weights."""


class BundleGraphMissingError(BundleFormatError):
    """The bundle has no graph of the requested kind (a valid bundle; add graphs with ptycho-export)."""


class BundleIntegrityError(BundleFormatError):
    """The bundle's contents are not what was written: damaged, or modified after export."""


class BundleChecksumError(BundleIntegrityError):
    """A payload's bytes do not match the checksum stored beside them."""


class BundleParserUnavailableError(BundleError):
    """The child process that parses bundles could not be started: a problem of this host, not of the file."""


def fix_damaged(path: Any) -> str:
    """The fix for a damaged or edited bundle, in every message that needs one."""
    return f"Copy {path} again from its source, or re-export it with ptycho-export."


def resolve_bundle_path(path: str | os.PathLike) -> Path:
    """Accept a bundle file or a folder holding ``wts.h5`` (the workflows' layout)."""
    p = Path(path)
    if p.is_dir():
        p = p / BUNDLE_FILENAME
    if not p.exists():
        raise BundleNotFoundError(
            f"No bundle at {p}: pass the path of a bundle file, or a folder that contains {BUNDLE_FILENAME}.", p)
    return p
