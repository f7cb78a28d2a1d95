"""Stitching for the training side: the runtime's implementation, re-exported.

One implementation for both sides means a reconstruction from eager PyTorch
and one from the runtime are stitched identically.
"""

from ptycho_runtime.reconstruction.stitching import Reconstruction, StitchCanvas, canvas_bounds, stitch_patches

__all__ = ["Reconstruction", "StitchCanvas", "canvas_bounds", "stitch_patches"]
