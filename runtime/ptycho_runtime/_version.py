"""The installed version of ptycho-runtime, in a module of its own so any layer can name it.

The package root (``ptycho_runtime/__init__.py``) imports every sub-package;
a module that took ``__version__`` from it would import the whole runtime (and
make a cycle). Everything that writes the version into a file takes it from here.
"""

from importlib import metadata as _metadata

try:  # the version is written once, in pyproject.toml
    __version__ = _metadata.version("ptycho-runtime")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
