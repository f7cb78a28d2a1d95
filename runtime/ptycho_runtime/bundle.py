"""Deprecated: moved to ``ptycho_runtime.inference.bundle`` (this alias goes away in the next release)."""

from ._deprecation import alias

alias(__name__, "ptycho_runtime.inference.bundle")
