"""Deprecated path of ``ptycho_runtime.hosts.ptychodus`` (goes away in the next release).

``import ptycho_runtime.ptychodus`` and its ``files`` / ``reconstructor``
modules keep working with a ``DeprecationWarning``; ``python -m
ptycho_runtime.ptychodus`` keeps starting ptychodus with our reconstructor
(now ``python -m ptycho_runtime.hosts.ptychodus``).
"""

from .._deprecation import warn_moved

warn_moved(__name__, "ptycho_runtime.hosts.ptychodus")

from ..hosts.ptychodus import *  # noqa: E402,F401,F403 - the old names, unchanged
from ..hosts.ptychodus import __all__  # noqa: E402,F401
