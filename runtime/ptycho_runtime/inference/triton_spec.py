"""What a bundle looks like as a Triton model: its tensor names and dims, and its identity parameters.

Why its own module, in ``inference``: three places describe the same Triton
model — the repository written for the official Triton container
(``distributed.triton_repository``), the model PyTriton serves
(``distributed.serve``), and what the client backend checks when it connects
(``inference.triton_backend``). They must agree exactly, so the tensor names,
dims, dtypes and the ``ptycho.*`` parameter keys are defined here and nowhere
else; the client backend sits below the server side, so this module does too.

Identity: the model config carries ``ptycho.sha256``, the SHA-256 of the
bundle *file*. The client hashes its own copy of the bundle and refuses a
server whose model carries another hash: normalisation and stitching run on
the client with the client's params, so client and server must hold the same
bundle, not merely the same graph. N, gridsize, intensity_scale, output_mode
and the graph's own hash are carried too, for people reading the config and
for messages that say what differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .. import format as fmt
from .._version import __version__
from ..format.checksum import file_sha256  # noqa: F401 - re-exported: the old triton_model had it

INPUT_NAME = "diffraction"
INFERENCE_MODEL = "diffraction_to_obj"
DEFAULT_MODEL_NAME = "ptycho"
PARAM_PREFIX = "ptycho."
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
