"""ptycho-runtime: load ptycho-export bundles without torch and run them fast.

    import ptycho_runtime as pr
    bundle = pr.load_bundle("wts.h5")                 # verified, params restored, backend chosen
    patches = bundle.predict(diffraction)             # complex64 [n, C, N, N]
    recon = bundle.reconstruct(diffraction, positions)  # stitched object, amplitude, phase, grid

Importing this package never imports torch (the TorchScript backend imports
it lazily, only when asked for).
"""

from .bundle import BACKENDS, Bundle, BundleInfo, load_bundle
from .bundle_format import (BundleChecksumError, BundleError, BundleFormatError, BundleGraphMissingError,
                            BundleIntegrityError,
                            BundleLimitError, BundleNotFoundError, BundleParamsError, BundleUnsafeError)
from .backends import DeviceUnavailableError
from .inputs import positions_from_metres
from .stitching import Reconstruction, StitchCanvas, stitch_patches
from .streaming import StreamingReconstructor

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Bundle",
    "BundleChecksumError",
    "BundleError",
    "BundleFormatError",
    "BundleGraphMissingError",
    "BundleIntegrityError",
    "BundleLimitError",
    "BundleNotFoundError",
    "BundleParamsError",
    "BundleUnsafeError",
    "BundleInfo",
    "DeviceUnavailableError",
    "Reconstruction",
    "StitchCanvas",
    "StreamingReconstructor",
    "load_bundle",
    "positions_from_metres",
    "stitch_patches",
]
