"""The checks on a bundle's values: params, physics metadata and graph metadata against the params.

Used by the reader (on every load) and the writer (so a bundle that saves
also loads); each failure is a ``BundleParamsError`` naming the key and the fix.
"""

from __future__ import annotations

import hmac
import math
import numbers
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .checksum import sha256_hex
from .errors import BundleChecksumError, BundleParamsError, fix_damaged
from .schema import (
    ALLOWED_N,
    AMP_ACTIVATIONS,
    MAX_FILTERS_SCALE,
    MAX_GRIDSIZE,
    MAX_PARAM_ARRAYS,
    MAX_PARAM_STRING,
    OUTPUT_NAMES,
    PHYSICS_KEYS,
)


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def validate_params(params: Mapping[str, Any], path: Any = None, where: str = "/params/config_json") -> None:
    """Types and ranges of the params every reader relies on; raise ``BundleParamsError`` naming the key."""

    def fail(key: str, what: str) -> BundleParamsError:
        return BundleParamsError(f"{path}: params '{key}' {what}. The bundle is damaged or was edited; re-export "
                                 "it with ptycho-export.", path, where)

    missing = [k for k in ("N", "gridsize", "intensity_scale") if params.get(k) is None]
    if missing:
        raise BundleParamsError(f"Cannot reconstruct model architecture: the bundle {path} has no "
                                f"{' or '.join(missing)} in its params. Re-save the model with save_torch_bundle.",
                                path, where)
    N = params.get("N")
    if not is_int(N) or N not in ALLOWED_N:
        raise fail("N", f"must be one of {', '.join(map(str, ALLOWED_N))} (got {short(N)})")
    g = params.get("gridsize")
    if not is_int(g) or not 1 <= g <= MAX_GRIDSIZE:
        raise fail("gridsize", f"must be an integer from 1 to {MAX_GRIDSIZE} (got {short(g)})")
    s = params.get("intensity_scale")
    if not is_number(s) or not math.isfinite(float(s)) or float(s) <= 0:
        raise fail("intensity_scale", f"must be a finite number > 0 (got {short(s)})")
    mode = params.get("output_mode", "amp_phase")
    if mode not in OUTPUT_NAMES:
        raise fail("output_mode", f"must be one of {', '.join(OUTPUT_NAMES)} (got {short(mode)})")
    nfs = params.get("n_filters_scale", 1)
    if not is_int(nfs) or not 1 <= nfs <= MAX_FILTERS_SCALE:
        raise fail("n_filters_scale", f"must be an integer from 1 to {MAX_FILTERS_SCALE} (got {short(nfs)})")
    for key in ("nphotons",):
        if key in params and (not is_number(params[key]) or not math.isfinite(params[key]) or params[key] <= 0):
            raise fail(key, f"must be a finite number > 0 (got {short(params[key])})")
    act = params.get("amp_activation", AMP_ACTIVATIONS[0])
    if act not in AMP_ACTIVATIONS:
        raise fail("amp_activation", f"must be one of {', '.join(AMP_ACTIVATIONS)} (got {short(act)})")
    _check_strings(params, fail)
    probe = params.get("probe")
    if probe is not None:
        p = np.asarray(probe)
        if p.dtype.kind != "c" or p.shape != (N, N):
            raise fail("probe", f"must be a complex [{N}, {N}] array (got {p.dtype} {list(p.shape)})")
        if not np.all(np.isfinite(p)):
            raise fail("probe", "contains NaN or inf")


def _check_strings(params: Mapping[str, Any], fail: Callable[[str, str], BundleParamsError]) -> None:
    """Every key, and every string value (also inside lists), at most ``MAX_PARAM_STRING`` characters.

    The params are shown to people (``info``, logs, reports) and handed to
    hosts' legacy ``params.cfg`` dicts: a megabyte "path" is never a real one.
    """
    for key, value in params.items():
        if not isinstance(key, str) or len(key) > MAX_PARAM_STRING:
            raise fail(short(key), f"is a key longer than {MAX_PARAM_STRING} characters")
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, str) and len(item) > MAX_PARAM_STRING:
                raise fail(key, f"is a string of {len(item)} characters; the format allows at most "
                                f"{MAX_PARAM_STRING}")


def validate_physics(meta: Any, path: Any = None, where: str = "/physics/metadata_json") -> dict[str, Optional[float]]:
    """The physics metadata, checked: only ``PHYSICS_KEYS``, each a finite number > 0 or None.

    Raises ``BundleParamsError`` naming the key.
    """
    if not isinstance(meta, Mapping):
        raise BundleParamsError(f"{path}: {where} is not a JSON object. {fix_damaged(path)}", path, where)
    out: dict[str, Optional[float]] = {}
    for key, value in meta.items():
        if key not in PHYSICS_KEYS:
            raise BundleParamsError(f"{path}: {where} has the unknown key {short(key)} (known: "
                                    f"{', '.join(PHYSICS_KEYS)}). {fix_damaged(path)}", path, where)
        if value is not None and (not is_number(value) or not math.isfinite(float(value)) or float(value) <= 0):
            raise BundleParamsError(f"{path}: {where} '{key}' must be a finite number > 0 or null (got "
                                    f"{short(value)}). {fix_damaged(path)}", path, where)
        out[key] = None if value is None else float(value)
    return out


def check_writable_params(scalars: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """The writer's side of the policy: refuse to write params the reader would refuse (``BundleParamsError``)."""
    merged = {**scalars, **arrays}
    validate_params(merged, "the params to save")
    shadow = sorted(set(scalars) & set(arrays))
    if shadow:
        raise BundleParamsError(f"params {shadow} are both scalars and arrays; store each key once.")
    if len(arrays) > MAX_PARAM_ARRAYS:
        raise BundleParamsError(f"{len(arrays)} array-valued params; a bundle holds at most {MAX_PARAM_ARRAYS}.")
    cap = int(merged["N"]) ** 2 * 16
    for key, arr in arrays.items():
        a = np.asarray(arr)
        if a.dtype.kind not in "biufc" or a.nbytes > cap:
            raise BundleParamsError(f"param '{key}' ({a.dtype} {list(a.shape)}) cannot be stored: array params are "
                                    f"numeric and at most N×N complex128 ({cap} bytes).")


def short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def graph_io(kind: str, model: str, params: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    """The inputs and outputs (name, shape with "batch", dtype) a graph of this bundle must declare."""
    N, C = int(params["N"]), int(params["gridsize"]) ** 2
    patch = ["batch", C, N, N]
    inputs = [{"name": "diffraction", "shape": patch, "dtype": "float32"}]
    if model == "autoencoder":
        inputs.append({"name": "offsets", "shape": ["batch", C, 1, 2], "dtype": "float32"})
    if kind == "onnx":
        outputs = [{"name": n, "shape": patch, "dtype": "float32"}
                   for n in OUTPUT_NAMES[params.get("output_mode", "amp_phase")]]
        if model == "autoencoder":
            outputs.append({"name": "pred_amplitude", "shape": patch, "dtype": "float32"})
    else:
        outputs = [{"name": "object", "shape": patch, "dtype": "complex64"}]
        if model == "autoencoder":
            outputs += [{"name": "pred_amplitude", "shape": patch, "dtype": "float32"},
                        {"name": "pred_intensity", "shape": patch, "dtype": "float32"}]
    return inputs, outputs


def check_graph_metadata(meta: Any, kind: str, model: str, params: Mapping[str, Any], data: bytes,
                          path: Path, where: str) -> None:
    def fail(what: str) -> BundleParamsError:
        return BundleParamsError(f"{path}: {where} {what}. Re-export the graphs with: ptycho-export --force {path}",
                                 path, where)

    if not isinstance(meta, dict):
        raise fail("is not a JSON object")
    inputs, outputs = graph_io(kind, model, params)
    for key, expected in (("inputs", inputs), ("outputs", outputs)):
        got = meta.get(key)
        if not isinstance(got, list) or not all(isinstance(x, dict) for x in got):
            raise fail(f"has no valid '{key}' list")
        plain = [{k: x.get(k) for k in ("name", "shape", "dtype")} for x in got]
        if plain != expected:
            raise fail(f"declares {key} {short(plain)}, but the params (N, gridsize, output_mode) need {expected}")
    sha = meta.get("sha256")
    if sha is not None and not (isinstance(sha, str) and hmac.compare_digest(sha, sha256_hex(data))):
        raise BundleChecksumError(f"{path}: the bytes of {where} do not match the sha256 in its metadata. "
                                  f"{fix_damaged(path)}", path, where)
    contract = meta.get("contract")
    if isinstance(contract, dict) and "intensity_scale" in contract:
        cs = contract["intensity_scale"]
        if not is_number(cs) or not math.isclose(float(cs), float(params["intensity_scale"]), rel_tol=1e-6):
            raise fail(f"was exported for intensity_scale {short(cs)}, but the params say "
                       f"{params['intensity_scale']!r}")
