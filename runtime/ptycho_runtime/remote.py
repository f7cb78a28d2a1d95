"""Deprecated alias of ``ptycho_runtime.inference.remote_errors`` (this path goes away in the next release)."""

from ._deprecation import alias

alias(__name__, "ptycho_runtime.inference.remote_errors")
