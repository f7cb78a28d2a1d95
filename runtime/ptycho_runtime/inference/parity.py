"""How graph outputs are compared with eager outputs — one definition for export, verify and the self-test.

Parity cases store their input as ``input.amplitude``: the normalised
amplitude ``Bundle.predict`` takes, *before* ``intensity_scale``. Every
comparison multiplies it by the bundle's ``intensity_scale`` exactly as
``predict`` does, so the stored eager outputs cover the whole inference path:
a bundle whose ``intensity_scale`` was changed (even with every checksum
recomputed) no longer reproduces them. Cases written before this rule hold
``input.diffraction`` in graph units instead (used as they are: those prove the
graph, not the scale).

Tolerances are constants of the reader, never read from the file.

Relative error of an output = max|got − ref| / max|ref| (a scale-aware
measure: it does not blow up where the reference is ~0, as an element-wise
ratio would). A graph passes when every output of every parity case is
within the tolerance (float32 default 1e-4).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

DEFAULT_TOLERANCE = 1e-4
# Load-time self-test (Bundle.self_test): stored eager outputs vs the predict path, per device/precision.
# CUDA fp32 may use TF32 convolutions; fp16 keeps ~3 significant digits.
SELF_TEST_TOLERANCE = {("cpu", "fp32"): 1e-4, ("cuda", "fp32"): 5e-3, ("cuda", "fp16"): 5e-2}


def graph_input(case: Mapping[str, np.ndarray], intensity_scale: float) -> np.ndarray:
    """A parity case's graph input in photon units: ``input.amplitude`` × intensity_scale, as predict computes it."""
    if "input.amplitude" in case:
        x = np.array(case["input.amplitude"], dtype=np.float32, copy=True)
        x *= np.float32(intensity_scale)
        return x
    return np.ascontiguousarray(case["input.diffraction"], dtype=np.float32)  # legacy: stored in graph units


def graph_feeds(case: Mapping[str, np.ndarray], model_name: str, intensity_scale: float) -> dict[str, np.ndarray]:
    """The feeds of one parity case for ``diffraction_to_obj`` (diffraction) or ``autoencoder`` (+ offsets)."""
    feeds = {"diffraction": graph_input(case, intensity_scale)}
    if model_name == "autoencoder":
        feeds["offsets"] = np.ascontiguousarray(case["input.offsets"], dtype=np.float32)
    return feeds


def case_batch(case: Mapping[str, np.ndarray]) -> int:
    """The number of patterns in a parity case."""
    key = "input.amplitude" if "input.amplitude" in case else "input.diffraction"
    return int(np.shape(case[key])[0])


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
