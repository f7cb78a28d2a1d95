"""The ptycho-export bundle format: its layout and limits, the one safe reader, the checks, the writer.

The lowest layer of the runtime (numpy + h5py; ``onnx`` lazily for graph
checks). Both the training side (``ptycho_export``, which writes bundles) and
every reader use it, so the layout, the limits and the checks live in exactly
one place. The names here are the format's public face; import them from
``ptycho_runtime.format`` (``from ptycho_runtime import format as fmt``).
"""

from .atomic import (
    atomic_h5_write,
    atomic_write_path,
)
from .checks import (
    check_graph_metadata,
    check_writable_params,
    graph_io,
    validate_params,
    validate_physics,
)
from .checksum import (
    file_sha256,
    payload_bytes,
    sha256_hex,
)
from .contents import (
    BundleContents,
    GraphRecord,
    ModelRecord,
)
from .errors import (
    BundleChecksumError,
    BundleError,
    BundleFormatError,
    BundleGraphMissingError,
    BundleIntegrityError,
    BundleLimitError,
    BundleNotFoundError,
    BundleParamsError,
    BundleParserUnavailableError,
    BundleUnsafeError,
    resolve_bundle_path,
)
from .graphs import (
    check_onnx_graph,
    check_torchscript_archive,
)
from .isolated import (
    check_bundle_file,
    close_parser,
    read_bundle,
)
from .policy import (
    check_header,
)
from .schema import (
    ALLOWED_N,
    AMP_ACTIVATIONS,
    BUNDLE_FILENAME,
    CHECKSUM_ATTR,
    DEFAULT_OPSET,
    FORMAT_NAME,
    FORMAT_VERSION,
    GRAPH_KINDS,
    HDF5_MAGIC,
    MAX_ATTR_STRING,
    MAX_ATTRS,
    MAX_CHILDREN,
    MAX_EPOCHS,
    MAX_FILTERS_SCALE,
    MAX_GRAPH_BATCH,
    MAX_GRAPH_BYTES,
    MAX_GRIDSIZE,
    MAX_HISTORY_METRICS,
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_ONNX_NODES,
    MAX_PARAM_ARRAYS,
    MAX_PARAM_STRING,
    MAX_PARITY_BATCH,
    MAX_PARITY_CASES,
    MAX_PARITY_ENTRIES,
    MAX_TENSORS_PER_MODEL,
    MAX_ZIP_ENTRIES,
    MODEL_NAMES,
    ONNX_ALLOWED_DOMAINS,
    ONNX_ALLOWED_OPS,
    ONNX_ELEM_FLOAT,
    ONNX_TENSOR_FACTOR,
    ONNX_TOTAL_FACTOR,
    OUTPUT_NAMES,
    PHYSICS_KEYS,
    TORCHSCRIPT_PICKLE_GLOBALS,
    WEIGHT_BYTES_PER_SCALE2,
)
from .writer import (
    split_params,
    write_bundle,
    write_graphs,
    write_header,
    write_json,
    write_payload,
    write_physics,
)

__all__ = [
    'AMP_ACTIVATIONS', 'MAX_PARAM_STRING',
    'ALLOWED_N', 'BUNDLE_FILENAME', 'BundleChecksumError', 'BundleContents', 'BundleError', 'BundleFormatError',
    'BundleGraphMissingError', 'BundleIntegrityError', 'BundleLimitError', 'BundleNotFoundError',
    'BundleParamsError', 'BundleParserUnavailableError', 'BundleUnsafeError', 'CHECKSUM_ATTR', 'DEFAULT_OPSET',
    'FORMAT_NAME', 'FORMAT_VERSION',
    'GRAPH_KINDS', 'GraphRecord', 'HDF5_MAGIC', 'MAX_ATTRS', 'MAX_ATTR_STRING', 'MAX_CHILDREN', 'MAX_EPOCHS',
    'MAX_FILTERS_SCALE', 'MAX_GRAPH_BATCH', 'MAX_GRAPH_BYTES', 'MAX_GRIDSIZE', 'MAX_HISTORY_METRICS', 'MAX_JSON_BYTES',
    'MAX_JSON_DEPTH', 'MAX_ONNX_NODES', 'MAX_PARAM_ARRAYS',
    'MAX_PARITY_BATCH', 'MAX_PARITY_CASES', 'MAX_PARITY_ENTRIES',
    'MAX_TENSORS_PER_MODEL', 'MAX_ZIP_ENTRIES', 'MODEL_NAMES', 'ModelRecord', 'ONNX_ALLOWED_DOMAINS',
    'ONNX_ALLOWED_OPS', 'ONNX_ELEM_FLOAT', 'ONNX_TENSOR_FACTOR', 'ONNX_TOTAL_FACTOR', 'OUTPUT_NAMES',
    'PHYSICS_KEYS', 'TORCHSCRIPT_PICKLE_GLOBALS',
    'WEIGHT_BYTES_PER_SCALE2', 'atomic_h5_write', 'atomic_write_path', 'check_bundle_file', 'check_graph_metadata',
    'check_header', 'check_onnx_graph', 'check_torchscript_archive', 'check_writable_params', 'close_parser',
    'file_sha256',
    'graph_io', 'payload_bytes', 'read_bundle', 'resolve_bundle_path', 'sha256_hex', 'split_params',
    'validate_params', 'validate_physics', 'write_bundle', 'write_graphs', 'write_header', 'write_json',
    'write_payload', 'write_physics'
]
