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

Layout (docs/architecture.md): ``format`` (the bundle file) → ``reconstruction``
(geometry, stitching) → ``refinement`` → ``inference`` (``Bundle``) → ``files``
(scan and reconstruction files) → ``hosts`` / ``distributed`` → ``cli``;
imports point down that list only. The flat module paths of earlier releases
(``ptycho_runtime.bundle``, ``.stitching``, ...) still work, with a
``DeprecationWarning``.
"""

from ._version import __version__  # noqa: F401 - the installed version, as before
from .format import (
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
from .inference.backends import DeviceUnavailableError
from .inference.bundle import BACKENDS, Bundle, BundleInfo, ReconstructionCancelled, load_bundle
from .inference.compatibility import HostPhysics, PhysicsMismatchError
from .inference.remote_errors import ClusterError, RemoteError, ServerModelMismatchError, ServerUnavailableError
from .inference.scan_refinement import RefineSettings
from .inference.streaming import StreamingReconstructor
from .reconstruction.alignment import align_patch_phases, stitch_scan
from .reconstruction.geometry import DEFAULT_CENTRE, ObjectGrid, frame_centre, to_default_centre
from .reconstruction.inputs import positions_from_metres, repair_bad_pixels
from .reconstruction.stitching import Reconstruction, StitchCanvas, probe_window, stitch_patches
from .refinement import RefinementCancelled, Refiner, RefineResult, refine, refine_epie

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
    "RefineSettings",
    "repair_bad_pixels",
    "stitch_patches",
    "stitch_scan",
    "to_default_centre",
]

# The flat modules of earlier releases were attributes of the package once it was imported
# (``ptycho_runtime.physics.object_pixel_size``). They still are, for one release: the first access
# imports the deprecated alias module, which warns and names the new path (PEP 562).
_OLD_MODULES = frozenset({"alignment", "backends", "bundle", "bundle_format", "cli_cluster", "geometry", "grouping",
                          "infer_many", "inputs", "npz", "parity", "physics", "ptychodus", "remote", "serve",
                          "stitching", "streaming", "triton_client", "triton_model", "worker"})


def __getattr__(name: str):  # noqa: ANN202 - a module
    if name in _OLD_MODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
