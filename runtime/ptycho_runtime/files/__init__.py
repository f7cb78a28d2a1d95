"""The files a run reads and writes besides the bundle: scan NPZs in, reconstruction HDF5 and PNG out.

One module per file kind, used by the ``ptycho-runtime`` and ``ptycho-export``
CLIs, ``infer-many`` and the hosts alike, so a reconstruction written on a
cluster is byte-for-byte the file ``infer`` writes. Every writer is atomic
(``format.atomic``): a file is the old one or the complete new one.
"""

from .npz import read_npz_arrays, write_npz_arrays
from .png import write_png
from .reconstruction_file import RECONSTRUCTION_FORMAT, Provenance, write_reconstruction

__all__ = ["RECONSTRUCTION_FORMAT", "Provenance", "read_npz_arrays", "write_npz_arrays", "write_png",
           "write_reconstruction"]
