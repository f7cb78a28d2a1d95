"""The bundle's layout and limits: the schema every writer and reader of the format follows.

Both the training side (`ptycho_export`, which writes bundles) and the runtime
(which reads them) use this sub-package (``ptycho_runtime.format``), so the layout, the limits and the checks
live in exactly one place: ``write_bundle`` and ``write_graphs`` are the only
code that names a group path for writing, ``read_bundle`` (→ ``BundleContents``)
the only code that reads one. It needs only numpy and h5py (and the ``onnx``
package, imported lazily, for ``check_onnx_graph``), so the write → read
round trip is tested without torch.

Layout (every dataset carries a ``sha256`` attribute over its bytes)::

    /                                  attrs: format, format_version, producer, *_version, created_utc, description
    /params/config_json                JSON of every scalar params.cfg key
    /params/arrays/<key>               array-valued params (e.g. the complex probe)
    /models/<name>/architecture_json   the architecture config the model is rebuilt from
    /models/<name>/state_dict/<key>    one dataset per tensor (dtype and shape preserved)
    /training/summary_json             intensity scale used, epochs, wall time ...
    /training/history/<metric>         loss per epoch
    /graphs/<kind>/<model>/bytes       uint8: a compiled graph (kind: onnx, torchscript)
    /graphs/<kind>/<model>/metadata_json
    /parity/<case>/<input or output>   fixed inputs (in the units ``Bundle.predict`` takes) and eager outputs
    /physics/metadata_json             optional: the instrument the model was trained for (``PHYSICS_KEYS``)

Why a reader policy: a bundle is a file users download, mail around and drop
into acquisition software, so every reader treats it as hostile. HDF5 can
point outside the file (external links, external raw storage, virtual
datasets), declare shapes far larger than the bytes it holds, and compress a
GiB into a MB. ``read_bundle`` therefore refuses, before reading any payload:
a path that is not a regular file; any link other than a hard link; external
storage; virtual datasets; any filter (the writer uses none, so there is no
decompression to bound); any object, dtype or shape the schema below does not
allow; and any dataset whose declared size exceeds its schema limit, its
stored bytes or the file. Checksums are then verified (messages never echo a
hash or the bytes that failed), params are checked against each other, and
graph metadata against params. Every failure is a ``BundleError`` subclass
naming the dataset and the fix; nothing else escapes a reader. libhdf5 runs
all of this in a child process under a time and memory limit
(``format.isolated``): some damaged metadata makes it loop where no check
can reach.
"""

from __future__ import annotations

import re

FORMAT_NAME = "ptycho-export-bundle"
# 2: HDF5 metadata with checksums (BUNDLE_LIBVER) and fixed-length strings; 1: variable-length strings in the
# unchecksummed global heap, HDF5 1.8 metadata. The reader reads both; the writer writes 2.
FORMAT_VERSION = 2
BUNDLE_LIBVER = ("v110", "v110")  # any HDF5 from 1.10 (2016) reads it
BUNDLE_FILENAME = "wts.h5"
CHECKSUM_ATTR = "sha256"
MODEL_NAMES = ("autoencoder", "diffraction_to_obj")
GRAPH_KINDS = ("onnx", "torchscript")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

# ---------------------------------------------------------------- limits (documented in docs/bundle-format.md)

ALLOWED_N = (64, 128, 256)
MAX_GRIDSIZE = 3
OUTPUT_NAMES = {"amp_phase": ("amplitude", "phase"), "real_imag": ("real", "imag")}
MAX_FILTERS_SCALE = 8
# Upper bound of one model's state_dict bytes at n_filters_scale = 1, per N (the largest gridsize, +5 %);
# weights scale with n_filters_scale², so a model may hold at most n_filters_scale² × this. A torch test pins it.
WEIGHT_BYTES_PER_SCALE2 = {64: 2_560_000, 128: 5_220_000, 256: 14_520_000}
MAX_TENSORS_PER_MODEL = 256
MAX_GRAPH_BYTES = 512 * 2**20          # one compiled graph
MAX_JSON_BYTES = 4 * 2**20             # one JSON document
MAX_JSON_DEPTH = 32
MAX_ATTR_STRING = 4096                 # one string attribute
MAX_PARAM_ARRAYS = 16
MAX_HISTORY_METRICS = 64
MAX_EPOCHS = 1_000_000
MAX_PARITY_CASES = 8
MAX_PARITY_BATCH = 64
MAX_PARITY_ENTRIES = 32                # datasets in one parity case
MAX_CHILDREN = 64                      # links in any group without a limit of its own above
# params: every string (a value, or one inside a list) and every key at most this long; amp_activation one of these
MAX_PARAM_STRING = 4096
AMP_ACTIVATIONS = ("sigmoid", "swish", "silu", "softplus", "relu")  # = ptycho_export.config.AMP_ACTIVATIONS (pinned)
MAX_ATTRS = 64                         # attributes on any object
# TorchScript archives: zip entries, and the globals their pickles may name (what torch.jit.save writes)
MAX_ZIP_ENTRIES = 10_000
TORCHSCRIPT_PICKLE_GLOBALS = re.compile(r"^(torch\._utils\._rebuild_\w+|torch\.\w*Storage|collections\.OrderedDict"
                                        r"|torch\.jit\._pickle\.\w+|__torch__(\.\w+)+|torch\.(device|Size)"
                                        r"|torch\._tensor\._rebuild_from_type_v2|builtins\.(set|frozenset))$")
# ONNX: the ops torch.onnx.export(dynamo=True) emits for our two models, collected over N 64-256 (the autoencoder
# transposes from N=128), gridsize 1-3, both output modes, every amp_activation, object.big/probe.big/probe.mask
# variants (+ Constant, Identity, Cast,
# which other exporter versions may add). No control flow (Loop/Scan/If), nothing that makes shapes from data
# (ConstantOfShape, Range, Tile). tests/hostile/test_limits.py pins the exporter's output to this list.
ONNX_ALLOWED_DOMAINS = ("", "ai.onnx")
ONNX_ALLOWED_OPS = frozenset("""
    Add Cast Clip Concat Constant Conv Cos Div Expand Gather Greater GridSample Identity MatMul MaxPool Mul Neg Pad
    ReduceSum Relu Reshape Resize Shape Sigmoid Sin Slice Softplus Sqrt Squeeze Sub Tanh Transpose Unsqueeze Where
""".split())
ONNX_ELEM_FLOAT = 1
# ONNX tensor sizes (format.graph_sizes): bounded for batches 1..MAX_GRAPH_BATCH (the runtime never runs a larger
# one), per pattern, in units of C·N²·n_filters_scale elements; the exporter's graphs reach 32 and 471 (N 64–256,
# gridsize 1–3, both output modes)
MAX_GRAPH_BATCH = 4096
ONNX_TENSOR_FACTOR = 128
ONNX_TOTAL_FACTOR = 2048
MAX_ONNX_NODES = 2048                  # the exporter's largest graph has 160
# The opset ptycho-export writes ONNX graphs at (torch.export's exporter needs 18 or newer). Defined here, torch-free,
# so the CLI's --help shows it without importing the exporter.
DEFAULT_OPSET = 20
# /physics/metadata_json (optional; bundles before it load as "unknown"): the instrument a model was trained for,
# so a host can be checked against it (inference.compatibility). Each value is a finite number > 0, or null.
PHYSICS_KEYS = {
    "photon_energy_eV": "photon energy (eV)",
    "detector_distance_m": "sample-detector distance (m)",
    "detector_pixel_size_m": "detector pixel size (m)",
    "object_pixel_size_m": "object (probe) pixel size (m): lambda * distance / (N * detector pixel)",
}
