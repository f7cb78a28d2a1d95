"""ptycho-export: PtychoPINN in PyTorch, trained eagerly, shipped as one pickle-free HDF5 bundle.

Public entry points: ``create_torch_model_with_gridsize`` (models),
``save_torch_bundle`` / ``load_torch_bundle`` (bundles), and
``ptycho_export.workflows.components`` (training workflows).
"""

__version__ = "0.1.0"
