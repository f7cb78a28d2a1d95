"""How graph outputs are compared with eager outputs — one definition for export and verify.

Relative error of an output = max|got − ref| / max|ref| (a scale-aware
measure: it does not blow up where the reference is ~0, as an element-wise
ratio would). A graph passes when every output of every parity case is
within the tolerance (float32 default 1e-4).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

DEFAULT_TOLERANCE = 1e-4


def relative_error(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max abs error, relative error); shape mismatch or non-finite output counts as infinite error."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape or not np.all(np.isfinite(got)):
        return float("inf"), float("inf")
    max_abs = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    denom = float(np.max(np.abs(ref))) if ref.size else 0.0
    return max_abs, (max_abs / denom if denom > 0 else max_abs)


def parity_report(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                  tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Compare matching keys of two output dicts; a key missing from ``got`` fails."""
    per_output: dict[str, dict[str, float]] = {}
    for key, r in ref.items():
        if key not in got:
            per_output[key] = {"max_abs": float("inf"), "rel": float("inf")}
            continue
        max_abs, rel = relative_error(r, got[key])
        per_output[key] = {"max_abs": max_abs, "rel": rel}
    max_rel = max((v["rel"] for v in per_output.values()), default=0.0)
    max_abs = max((v["max_abs"] for v in per_output.values()), default=0.0)
    return {"per_output": per_output, "max_abs": max_abs, "max_rel": max_rel, "tolerance_rel": tolerance,
            "passed": bool(max_rel <= tolerance)}
