"""ptycho-runtime: load ptycho-export bundles without torch and run them fast.

    import ptycho_runtime as pr
    bundle = pr.load_bundle("wts.h5")                 # verified, params restored, backend chosen
    patches = bundle.predict(diffraction)             # complex64 [n, C, N, N]
    recon = bundle.reconstruct(diffraction, positions)  # stitched object, amplitude, phase, grid
    recon = bundle.reconstruct(counts, pos_m, counts=True, units="metres",   # on the host's object grid
                               grid=pr.ObjectGrid((H, W), pixel_m, centre_m), fill=1)

Logging: everything logs under the ``ptycho_runtime`` logger (load, each
reconstruction, what was clipped at the grid's edge).

Importing this package never imports torch (the TorchScript backend imports
it lazily, only when asked for), nor onnxruntime (imported when a bundle is
loaded: install ``ptycho-runtime[cpu]`` or ``ptycho-runtime[gpu]``).
"""

from importlib import metadata as _metadata

from .alignment import align_patch_phases, stitch_scan
from .backends import DeviceUnavailableError
from .bundle import BACKENDS, Bundle, BundleInfo, ReconstructionCancelled, load_bundle
from .bundle_format import (
    BundleChecksumError,
    BundleError,
    BundleFormatError,
    BundleGraphMissingError,
    BundleIntegrityError,
    BundleLimitError,
    BundleNotFoundError,
    BundleParamsError,
    BundleUnsafeError,
)
from .geometry import DEFAULT_CENTRE, ObjectGrid, frame_centre, to_default_centre
from .inputs import positions_from_metres, repair_bad_pixels
from .physics import HostPhysics, PhysicsMismatchError
from .refinement import RefinementCancelled, Refiner, RefineResult, refine, refine_epie
from .remote import ClusterError, RemoteError, ServerModelMismatchError, ServerUnavailableError
from .stitching import Reconstruction, StitchCanvas, probe_window, stitch_patches
from .streaming import StreamingReconstructor

try:  # the version is written once, in pyproject.toml
    __version__ = _metadata.version("ptycho-runtime")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BACKENDS",
    "DEFAULT_CENTRE",
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
    "ClusterError",
    "DeviceUnavailableError",
    "HostPhysics",
    "ObjectGrid",
    "PhysicsMismatchError",
    "Reconstruction",
    "ReconstructionCancelled",
    "RefineResult",
    "RefinementCancelled",
    "Refiner",
    "RemoteError",
    "ServerModelMismatchError",
    "ServerUnavailableError",
    "StitchCanvas",
    "StreamingReconstructor",
    "align_patch_phases",
    "frame_centre",
    "load_bundle",
    "positions_from_metres",
    "probe_window",
    "refine",
    "refine_epie",
    "repair_bad_pixels",
    "stitch_patches",
    "stitch_scan",
    "to_default_centre",
]
