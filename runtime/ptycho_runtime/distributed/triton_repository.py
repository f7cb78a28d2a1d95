"""The Triton model repository of a bundle: ``config.pbtxt`` and ``model.onnx`` (``ptycho-runtime triton-repo``).

The model's tensors and identity parameters are ``inference.triton_spec``
(shared with the client backend and ``serve``); this module adds what only a
server needs: batching, instance groups, TensorRT, and the files Triton reads.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import format as fmt
from .._version import __version__
from ..inference.triton_spec import (  # noqa: F401 - INPUT_NAME, PARAM_PREFIX: re-exported for the old triton_model
    DEFAULT_MODEL_NAME,
    INFERENCE_MODEL,
    INPUT_NAME,
    PARAM_PREFIX,
    TritonModelSpec,
    check_model_name,
    file_sha256,
    model_spec,
)

DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_QUEUE_DELAY_US = 100
DEFAULT_INSTANCES = "gpu:1"
TENSORRT_WORKSPACE_BYTES = 1 << 30
MAX_INSTANCES = 64
MAX_BATCH_LIMIT = 4096


def check_max_batch_size(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH_LIMIT:
        raise ValueError(f"max batch size must be an integer in 1..{MAX_BATCH_LIMIT} (got {value!r}); the "
                         "bundle's graph has a batch dimension, so Triton must batch (0 would turn it off)")
    return value


def check_queue_delay(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10_000_000:
        raise ValueError(f"max queue delay must be 0..10000000 microseconds (got {value!r})")
    return value


def parse_instances(text: str) -> tuple[str, int]:
    """``"gpu:2"`` → ("KIND_GPU", 2); ``"cpu"`` → ("KIND_CPU", 1)."""
    kind, _, count = str(text).strip().lower().partition(":")
    try:
        n = int(count) if count else 1
    except ValueError:
        n = -1
    if kind not in ("gpu", "cpu") or not 1 <= n <= MAX_INSTANCES:
        raise ValueError(f"instances must be KIND[:COUNT] with KIND gpu or cpu and COUNT 1..{MAX_INSTANCES}, "
                         f"e.g. gpu:2 or cpu:1 (got {text!r})")
    return f"KIND_{kind.upper()}", n


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Batch sizes the dynamic batcher should aim for: a quarter of the maximum, and the maximum."""
    return sorted({max(1, max_batch_size // 4), max_batch_size})


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_pbtxt(spec: TritonModelSpec, name: str = DEFAULT_MODEL_NAME,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, instances: str = DEFAULT_INSTANCES,
                 tensorrt_fp16: bool = False, max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US) -> str:
    """The ``config.pbtxt`` (protobuf text of Triton's ``ModelConfig``) for the ONNX Runtime backend."""
    check_model_name(name)
    check_max_batch_size(max_batch_size)
    check_queue_delay(max_queue_delay_us)
    kind, count = parse_instances(instances)
    if tensorrt_fp16 and kind != "KIND_GPU":
        raise ValueError("the TensorRT accelerator runs on NVIDIA GPUs only: use --instances gpu:K with "
                         "--tensorrt-fp16, or drop --tensorrt-fp16 for CPU instances")
    dims = ", ".join(str(d) for d in spec.dims)

    def tensor(tname: str) -> str:
        return f"  {{\n    name: {_quote(tname)}\n    data_type: TYPE_FP32\n    dims: [ {dims} ]\n  }}"

    lines = [
        f"# Written by ptycho-runtime {__version__} (triton-repo) from the bundle with sha256 {spec.bundle_sha256}.",
        "# Clients check the ptycho.* parameters against their own copy of the bundle; regenerate this file",
        "# with `ptycho-runtime triton-repo BUNDLE OUT_DIR` rather than editing it.",
        f"name: {_quote(name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        tensor(INPUT_NAME),
        "]",
        "output [",
        ",\n".join(tensor(n) for n in spec.output_names),
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred_batch_sizes(max_batch_size))} ]",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "instance_group [",
        f"  {{\n    count: {count}\n    kind: {kind}\n  }}",
        "]",
    ]
    if tensorrt_fp16:
        lines += [
            "optimization {",
            "  execution_accelerators {",
            "    gpu_execution_accelerator: [",
            "      {",
            '        name: "tensorrt"',
            '        parameters { key: "precision_mode" value: "FP16" }',
            f'        parameters {{ key: "max_workspace_size_bytes" value: "{TENSORRT_WORKSPACE_BYTES}" }}',
            "      }",
            "    ]",
            "  }",
            "}",
        ]
    for key, value in spec.parameters().items():
        lines.append(f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}")
    return "\n".join(lines) + "\n"


def write_model_repository(bundle_path: str | os.PathLike, out_dir: str | os.PathLike,
                           name: str = DEFAULT_MODEL_NAME, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                           instances: str = DEFAULT_INSTANCES, tensorrt_fp16: bool = False,
                           max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US) -> Path:
    """Write ``OUT_DIR/NAME/1/model.onnx`` and ``OUT_DIR/NAME/config.pbtxt``; return ``OUT_DIR/NAME``.

    The graph is the bundle's verified ``diffraction_to_obj`` ONNX graph:
    checksums and the reader policy (``read_bundle``), the op allow-list
    (``check_onnx_graph``) and the stored parity cases run on the CPU
    (``Bundle.self_test``) all pass before a byte is written. Both files are
    written atomically; other models in ``OUT_DIR`` are left alone.
    """
    from ..inference.bundle import Bundle

    check_model_name(name)
    contents = fmt.read_bundle(bundle_path)
    graph = contents.graph("onnx", INFERENCE_MODEL).data  # BundleGraphMissingError names the fix
    Bundle(contents, backend="onnx", device="cpu")  # op check + self-test: the graph runs and matches its params
    text = config_pbtxt(model_spec(contents), name, max_batch_size, instances, tensorrt_fp16, max_queue_delay_us)
    model_dir = Path(out_dir) / name
    with fmt.atomic_write_path(model_dir / "1" / "model.onnx") as tmp:
        tmp.write_bytes(graph)
    with fmt.atomic_write_path(model_dir / "config.pbtxt") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return model_dir
