"""A bundle as a Triton model: its tensors, its identity parameters, and the model repository that serves it.

Why one module: three places describe the same Triton model — the repository
written for the official Triton container (``ptycho-runtime triton-repo``),
the model PyTriton serves (``ptycho-runtime serve``), and what the client
backend checks when it connects (``triton_client``). They must agree exactly,
so the tensor names, dims, dtypes and the ``ptycho.*`` parameter keys are
defined here and nowhere else.

Identity: the model config carries ``ptycho.sha256``, the SHA-256 of the
bundle *file*. The client hashes its own copy of the bundle and refuses a
server whose model carries another hash: normalisation and stitching run on
the client with the client's params, so client and server must hold the same
bundle, not merely the same graph. N, gridsize, intensity_scale, output_mode
and the graph's own hash are carried too, for people reading the config and
for messages that say what differs.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import __version__
from . import bundle_format as fmt

INPUT_NAME = "diffraction"
INFERENCE_MODEL = "diffraction_to_obj"
DEFAULT_MODEL_NAME = "ptycho"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_QUEUE_DELAY_US = 100
DEFAULT_INSTANCES = "gpu:1"
PARAM_PREFIX = "ptycho."
TENSORRT_WORKSPACE_BYTES = 1 << 30
MAX_INSTANCES = 64
MAX_BATCH_LIMIT = 4096
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class TritonModelSpec:
    """What a Triton model of one bundle looks like: tensors (without the batch dim) and identity."""

    N: int
    gridsize: int
    intensity_scale: float
    output_mode: str
    output_names: tuple[str, str]
    bundle_sha256: str
    graph_sha256: Optional[str]

    @property
    def dims(self) -> list[int]:
        """Per-item dims of the input and of both outputs: [C, N, N] (Triton adds the batch dim)."""
        return [self.gridsize**2, self.N, self.N]

    def parameters(self, device: Optional[str] = None) -> dict[str, str]:
        """The ``ptycho.*`` model-config parameters (string values, as Triton stores them)."""
        params = {
            "sha256": self.bundle_sha256,
            "N": str(self.N),
            "gridsize": str(self.gridsize),
            "intensity_scale": repr(float(self.intensity_scale)),
            "output_mode": self.output_mode,
            "runtime_version": __version__,
        }
        if self.graph_sha256:
            params["graph_sha256"] = self.graph_sha256
        if device:
            params["device"] = device
        return {PARAM_PREFIX + k: v for k, v in params.items()}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_spec(contents: fmt.BundleContents, with_graph: bool = True) -> TritonModelSpec:
    """The Triton model of a verified bundle. ``with_graph``: also hash its ONNX graph (absent → None)."""
    p = contents.params
    output_mode = str(p.get("output_mode", "amp_phase"))
    graph_sha = None
    if with_graph and ("onnx", INFERENCE_MODEL) in contents.graphs:
        graph_sha = fmt.sha256_hex(contents.graphs[("onnx", INFERENCE_MODEL)].data)
    names = fmt.OUTPUT_NAMES[output_mode]
    return TritonModelSpec(int(p["N"]), int(p["gridsize"]), float(p["intensity_scale"]), output_mode,
                           (names[0], names[1]), file_sha256(contents.path), graph_sha)


def check_model_name(name: str) -> str:
    """Triton model names become folder names and URL parts: letters, digits, '_', '.', '-' only."""
    if not isinstance(name, str) or not _MODEL_NAME.match(name) or name in (".", ".."):
        raise ValueError(f"model name {name!r} is not usable: use 1-128 letters, digits, '_', '.' or '-', "
                         "not starting with '.' or '-'")
    return name


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
    from .bundle import Bundle

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
