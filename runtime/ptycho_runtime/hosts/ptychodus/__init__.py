"""ptycho-runtime inside ptychodus (``pip install 'ptycho-runtime[ptychodus]'``, ptychodus 1.7).

- ``PtychoRuntimeReconstructorLibrary`` / ``PtychoRuntimeReconstructor``
  (``reconstructor``): a bundle as a ptychodus reconstructor, warm in a worker
  process, with progress and cancellation between micro-batches.
- ``python -m ptycho_runtime.hosts.ptychodus [ptychodus arguments]`` (``__main__``):
  ptychodus with that library registered (GUI, or ``-b reconstruct -i IN -o OUT``).
- ``files``: ptychodus's product and diffraction files ↔ the runtime, for the
  reconstructor and both CLIs.

Importing this package imports ptychodus (an ``ImportError`` naming the extra
otherwise); the core runtime never does.
"""

try:
    import ptychodus  # noqa: F401
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("ptycho_runtime.hosts.ptychodus needs ptychodus 1.7: "
                      "pip install 'ptycho-runtime[ptychodus]'") from exc

from .files import HostScan, host_scan, output_product, read_input, write_product
from .reconstructor import (
    ALGORITHM,
    PtychoRuntimeReconstructor,
    PtychoRuntimeReconstructorLibrary,
    PtychoRuntimeSettings,
)

__all__ = ["ALGORITHM", "HostScan", "PtychoRuntimeReconstructor", "PtychoRuntimeReconstructorLibrary",
           "PtychoRuntimeSettings", "host_scan", "output_product", "read_input", "write_product"]
