"""ptycho-export: PtychoPINN in PyTorch, trained eagerly, shipped as one pickle-free HDF5 bundle.

Public entry points: ``create_torch_model_with_gridsize`` (models),
``save_torch_bundle`` / ``load_torch_bundle`` (bundles), and
``ptycho_export.workflows.components`` (training workflows).
"""

from importlib import metadata as _metadata

try:  # the version is written once, in pyproject.toml
    __version__ = _metadata.version("ptycho-export")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
