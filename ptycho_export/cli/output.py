"""What the commands print and write: JSON-safe data, plain-text tables, number cells, atomic text files.

Shared by every command so the tables and the JSON look the same everywhere;
nothing here knows about a particular command.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np


def plain(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays → Python, non-finite floats → None, paths → str."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, np.generic):
        return plain(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, complex):
        return {"real": plain(obj.real), "imag": plain(obj.imag)}
    return obj


def print_json(obj: Any) -> None:
    print(json.dumps(plain(obj), indent=2, sort_keys=False, allow_nan=False))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "") -> str:
    """A left-aligned text table with a dashed rule under the header; None cells show as '-'."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(indent + line for line in lines)


def err_cell(x: Optional[float]) -> str:
    """A relative or absolute error in a table: two significant digits, 'inf' or '-'."""
    if x is None:
        return "-"
    return "inf" if not math.isfinite(x) else f"{x:.2e}"


def mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def secs(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def graph_rows(summary: Mapping[str, Any]) -> list[list[Any]]:
    """One table row per graph of an ``add_graphs_to_bundle`` summary (``bundle`` and ``train`` print it)."""
    rows = []
    for name, g in summary["graphs"].items():
        method = g.get("method") or "-"
        if g.get("opset"):
            method = f"{method} (opset {g['opset']})"
        rows.append([name, method, mib(g.get("size_bytes")), err_cell(g.get("max_rel_error")),
                     secs(g.get("export_time_s")), "refreshed" if g.get("refreshed") else "kept"])
    return rows


GRAPH_HEADERS = ("graph", "method", "size MiB", "max rel err vs eager", "export s", "status")

METRIC_ROWS = (
    ("phase SSIM", "phase_ssim", "{:.3f}"),
    ("phase RMSE (rad)", "phase_rmse_rad", "{:.4f}"),
    ("phase PSNR (dB)", "phase_psnr_db", "{:.2f}"),
    ("amplitude SSIM", "amplitude_ssim", "{:.3f}"),
    ("amplitude RMSE", "amplitude_rmse", "{:.4f}"),
    ("amplitude PSNR (dB)", "amplitude_psnr_db", "{:.2f}"),
    ("FRC resolution (px, 1/7)", "frc_resolution_px", "{:.2f}"),
)
"""(label, metric key, format) of every quality number, in the order ``evaluate`` and the training report show them."""


def metric_cell(value: Any, fmt: str) -> str:
    """One quality number as text: '-' for none, 'inf'/'-inf' for non-finite."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf"
    return fmt.format(value)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file so a crash never leaves half of it under the final name."""
    from ptycho_runtime.format import atomic_write_path

    with atomic_write_path(path) as tmp:
        tmp.write_text(text)
