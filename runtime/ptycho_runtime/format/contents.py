"""A bundle in memory: ``BundleContents`` (what a reader returns), ``GraphRecord``, ``ModelRecord``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from .errors import BundleGraphMissingError


@dataclass
class GraphRecord:
    """One compiled graph: its bytes and its metadata.

    Read back by ``read_bundle``, the bytes are checksum-verified and the
    metadata checked against the params; handed to ``write_graphs``, they are
    what gets stored.
    """

    kind: str
    model: str
    data: bytes
    metadata: dict[str, Any]


@dataclass
class BundleContents:
    """Everything in a bundle, read into memory and verified; the file is closed again.

    What every reader needs, so none opens the file itself: ``header`` (root
    attributes), ``params`` (scalars and arrays merged, validated),
    ``architectures`` and ``state_dicts`` per model, ``n_parameters`` per
    model, ``training`` (summary) and ``history`` (per-epoch metrics),
    ``graphs`` by (kind, model), ``parity`` cases, and ``file_size``.
    """

    path: Path
    header: dict[str, Any]
    params: dict[str, Any]
    architectures: dict[str, dict[str, Any]] = field(default_factory=dict)
    state_dicts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    history: dict[str, np.ndarray] = field(default_factory=dict)
    graphs: dict[tuple[str, str], GraphRecord] = field(default_factory=dict)
    parity: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    n_parameters: dict[str, int] = field(default_factory=dict)
    file_size: int = 0
    physics: dict[str, Optional[float]] = field(default_factory=dict)

    def graph(self, kind: str, model: str) -> GraphRecord:
        try:
            return self.graphs[(kind, model)]
        except KeyError:
            have = ", ".join(f"{k}/{m}" for k, m in sorted(self.graphs)) or "none"
            raise BundleGraphMissingError(
                f"The bundle {self.path} has no {kind} graph for {model} (graphs present: {have}). "
                f"Add graphs with: ptycho-export {self.path}", self.path, f"/graphs/{kind}/{model}"
            ) from None


@dataclass
class ModelRecord:
    """One model as the writer stores it: the architecture it is rebuilt from and its tensors (numpy)."""

    architecture: dict[str, Any]
    state_dict: Mapping[str, np.ndarray]
    n_parameters: int
