"""Re-check a bundle on this machine: checksums, then every graph on every available backend.

``verify_bundle`` reads the bundle (every dataset's sha256 is verified; a
mismatch is *reported*, not raised), then recomputes the stored parity
cases with each backend and compares the results with the eager outputs
stored at export time, using ``ptycho_runtime.inference.parity.parity_report`` (the
same definition export used):

- ``eager``: the PyTorch models rebuilt from the bundle's weights and its own
  params (``models_from_contents``: the global ``params.cfg`` is not
  touched), tolerance 1e-5 (same code, same weights);
- ``torchscript``: the stored TorchScript archives (``torchscript_runner``);
- ``onnxruntime-cpu``: the stored ONNX graphs on onnxruntime's CPU provider;
- ``onnxruntime-cuda``: the same on the CUDA provider, only where onnxruntime
  offers it *and* a session really runs on it (no silent CPU fallback).

Parity inputs are stored in the units ``Bundle.predict`` takes and fed as
amplitude × the bundle's ``intensity_scale`` (``ptycho_runtime.inference.parity``), so a
bundle whose scale was changed fails here even with consistent checksums.
Tolerances are this module's constants (1e-4 for graphs, 1e-5 eager), never
the file's own metadata, unless the caller passes ``tolerance``. Graph bytes
pass the reader policy (``check_onnx_graph`` / ``check_torchscript_archive``)
before onnxruntime or torch sees them; a graph refused there raises its
``BundleError`` (the bundle is unsafe, not merely inaccurate).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from ptycho_runtime import format as fmt
from ptycho_runtime.inference.backends import import_onnxruntime, quiet_library_warnings
from ptycho_runtime.inference.parity import DEFAULT_TOLERANCE, case_batch, graph_feeds, parity_report

BACKENDS = ("eager", "torchscript", "onnxruntime-cpu", "onnxruntime-cuda")
EAGER_TOLERANCE = 1e-5
GRAPH_KIND = {"eager": None, "torchscript": "torchscript", "onnxruntime-cpu": "onnx", "onnxruntime-cuda": "onnx"}

__all__ = ["BACKENDS", "EAGER_TOLERANCE", "verify_bundle"]

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


# --------------------------------------------------------------------------- runners


def _eager_runners(contents: fmt.BundleContents) -> dict[str, tuple[Runner, list[str]]]:
    """The eager reference export used (``export.eager_runners``), rebuilt from the bundle; params.cfg untouched."""
    from .export import eager_runners
    from .model_manager import models_from_contents

    return eager_runners(models_from_contents(contents), contents.params)


def _ort_session(data: bytes, provider: str):
    ort = import_onnxruntime()
    quiet_library_warnings()  # ort warns when a requested provider is missing; we report that ourselves
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # no warnings about provider fallbacks on stderr
    session = ort.InferenceSession(data, sess_options=opts, providers=providers)
    if provider not in session.get_providers():
        raise RuntimeError(f"onnxruntime created the session on {session.get_providers()}, not on {provider}")
    return session


def _ort_runner(session) -> Runner:
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}
    return lambda feeds: dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in inputs}),
                                  strict=True))


def _cuda_probe() -> Optional[str]:
    """None if onnxruntime really runs on CUDA here, else the reason it does not."""
    try:
        ort = import_onnxruntime()
    except ImportError as exc:
        return str(exc)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime offers no CUDAExecutionProvider (CPU build or no GPU)"
    return None


# --------------------------------------------------------------------------- comparison


def _compare(run: Runner, model: str, keys: Iterable[str], cases: Mapping[str, Mapping[str, np.ndarray]],
             tolerance: float, intensity_scale: float) -> dict[str, Any]:
    got, ref = {}, {}
    for case_name, case in cases.items():
        result = run(graph_feeds(case, model, intensity_scale))
        for name in keys:
            stored = f"{model}.{name}"
            if stored not in case:
                continue  # the bundle's parity vectors do not cover this output
            key = f"{case_name}.{name}"
            ref[key] = case[stored]
            if name in result:  # parity_report counts a missing output as a failure
                got[key] = result[name]
    if not ref:
        raise ValueError(f"the bundle's parity vectors hold no outputs of {model} to compare with")
    report = parity_report(ref, got, tolerance)
    worst = max(report["per_output"].items(), key=lambda kv: kv[1]["rel"])[0]
    return {"max_rel": float(report["max_rel"]), "max_abs": float(report["max_abs"]),
            "tolerance_rel": float(tolerance), "passed": bool(report["passed"]), "worst_output": worst,
            "n_compared": len(ref),
            "per_output": {k: {"rel": float(v["rel"]), "max_abs": float(v["max_abs"])}
                           for k, v in report["per_output"].items()}}


def _graph_tolerance(override: Optional[float]) -> float:
    """The caller's tolerance, else the reader's constant (a file never sets its own tolerance)."""
    return DEFAULT_TOLERANCE if override is None else float(override)


def _row(backend: str, model: str, kind: Optional[str], **fields: Any) -> dict[str, Any]:
    base = {"backend": backend, "graph": model, "kind": kind or "eager", "max_rel": None, "max_abs": None,
            "tolerance_rel": None, "passed": False, "error": None}
    base.update(fields)
    return base


# --------------------------------------------------------------------------- one backend


def _check_graph_policy(contents: fmt.BundleContents, wanted: Iterable[str], bundle_path: Any) -> None:
    """The reader policy for every graph a requested backend will load, before any backend runs (raises)."""
    kinds = {GRAPH_KIND[b] for b in wanted} - {None}
    for (kind, model), rec in sorted(contents.graphs.items()):
        if kind == "torchscript" and kind in kinds:
            fmt.check_torchscript_archive(rec.data, model, bundle_path)
        elif kind == "onnx" and kind in kinds:
            fmt.check_onnx_graph(rec.data, (kind, model), contents.params, bundle_path)


def _verify_eager(contents: fmt.BundleContents, info: dict[str, Any], tolerance: Optional[float],
                  scale: float) -> list[dict[str, Any]]:
    """Rows for the PyTorch models rebuilt from the bundle (``info`` says why none, when unavailable)."""
    missing = [m for m in fmt.MODEL_NAMES if m not in contents.state_dicts]
    if missing:
        info.update(available=False, reason=f"no eager weights for {', '.join(missing)}")
        return []
    try:
        runners = _eager_runners(contents)
    except ImportError as exc:
        info.update(available=False, reason=f"torch is not importable ({exc})")
        return []
    info["provider"] = "torch (CPU)"
    tol = EAGER_TOLERANCE if tolerance is None else float(tolerance)
    rows = []
    for model in fmt.MODEL_NAMES:
        run, keys = runners[model]
        try:
            rows.append(_row("eager", model, None, **_compare(run, model, keys, contents.parity, tol, scale)))
        except Exception as exc:  # noqa: BLE001 - a crash while recomputing is a verification failure
            rows.append(_row("eager", model, None, tolerance_rel=tol, error=f"{type(exc).__name__}: {exc}"))
    return rows


def _unavailable(backend: str) -> Optional[str]:
    """Why a graph backend cannot run here (None when it can)."""
    if backend == "onnxruntime-cuda":
        return _cuda_probe()
    if backend == "onnxruntime-cpu":
        try:
            import_onnxruntime()
        except ImportError as exc:
            return str(exc)
        return None
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return f"torch is not importable ({exc})"
    return None


class _NotOnCuda(Exception):
    """onnxruntime offers CUDA but created the session elsewhere (no driver or GPU): skip, as if not offered."""


def _graph_runner(backend: str, kind: str, model: str, data: bytes, info: dict[str, Any]) -> Runner:
    from .export import torchscript_runner

    if kind == "torchscript":
        info["provider"] = "torch.jit (CPU)"
        return torchscript_runner(data, model)
    provider = "CUDAExecutionProvider" if backend == "onnxruntime-cuda" else "CPUExecutionProvider"
    try:
        session = _ort_session(data, provider)
    except RuntimeError as exc:
        if backend == "onnxruntime-cuda" and "not on CUDAExecutionProvider" in str(exc):
            raise _NotOnCuda(str(exc)) from None
        raise
    info["provider"] = provider
    return _ort_runner(session)


def _verify_graphs(backend: str, contents: fmt.BundleContents, info: dict[str, Any], tolerance: Optional[float],
                   scale: float) -> list[dict[str, Any]]:
    """Rows for the stored graphs of one backend (``info`` says why none, when unavailable)."""
    kind = GRAPH_KIND[backend]
    graphs = {m: contents.graphs[(kind, m)] for m in fmt.MODEL_NAMES if (kind, m) in contents.graphs}
    if not graphs:
        info.update(available=False, reason=f"the bundle holds no {kind} graphs")
        return []
    reason = _unavailable(backend)
    if reason:
        info.update(available=False, reason=reason)
        return []
    from .export import parity_keys

    rows = []
    tol = _graph_tolerance(tolerance)  # (the graphs passed the reader policy already)
    for model, rec in graphs.items():
        try:
            run = _graph_runner(backend, kind, model, rec.data, info)
            keys = parity_keys(kind, model, rec.metadata)
            rows.append(_row(backend, model, kind, **_compare(run, model, keys, contents.parity, tol, scale)))
        except _NotOnCuda as exc:  # offered but not usable (no driver/GPU): skipped, like a missing provider
            info.update(available=False, reason=str(exc), provider=None)
            return []
        except Exception as exc:  # noqa: BLE001 - graph bytes that pass the checksum but do not load/run
            rows.append(_row(backend, model, kind, tolerance_rel=tol, error=f"{type(exc).__name__}: {exc}"))
    return rows


# --------------------------------------------------------------------------- public


def _wanted_backends(backends: Optional[Iterable[str]]) -> list[str]:
    wanted = list(dict.fromkeys(BACKENDS if backends is None else backends))
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(map(repr, unknown))}; choose from {', '.join(BACKENDS)}")
    return wanted


def verify_bundle(path: str | os.PathLike, backends: Optional[Iterable[str]] = None,
                  tolerance: Optional[float] = None) -> dict[str, Any]:
    """Verify checksums, then recompute every parity case on every requested/available backend.

    Args:
        path: bundle file or a folder holding ``wts.h5``.
        backends: subset of ``BACKENDS`` (default: all; unavailable ones are
            reported as skipped, with the reason).
        tolerance: relative tolerance for every comparison (default: each
            graph's export tolerance, 1e-5 for eager).

    Returns ``{"bundle", "checksum": {"ok", "error"}, "cases", "backends":
    {name: {"available", "reason", "provider"}}, "results": [one row per
    backend × graph: backend, graph, kind, max_rel, max_abs, tolerance_rel,
    passed, error, per_output], "passed", "status"}``; ``status`` is "ok",
    "parity_mismatch", "checksum_failure" or "nothing_verified".

    Raises:
        FileNotFoundError: no bundle at ``path``.
        BundleFormatError: not a bundle, or a bundle without parity vectors.
        ValueError: an unknown backend name.
    """
    start = time.perf_counter()
    wanted = _wanted_backends(backends)
    bundle_path = fmt.resolve_bundle_path(path)
    report: dict[str, Any] = {"bundle": str(bundle_path), "checksum": {"ok": True, "error": None}, "cases": {},
                              "backends": {}, "results": [], "passed": False, "status": "ok"}
    try:
        contents = fmt.read_bundle(bundle_path)
    except fmt.BundleChecksumError as exc:
        report["checksum"] = {"ok": False, "error": str(exc)}
        report["status"] = "checksum_failure"
        report["wall_time_s"] = time.perf_counter() - start
        return report
    if not contents.parity:
        raise fmt.BundleFormatError(
            f"{bundle_path} holds no parity vectors, so there is nothing to verify against. "
            f"Add graphs (which stores them) with: ptycho-export {bundle_path}")
    report["cases"] = {name: case_batch(case) for name, case in sorted(contents.parity.items())}
    _check_graph_policy(contents, wanted, bundle_path)
    scale = float(contents.params["intensity_scale"])
    for backend in wanted:
        info: dict[str, Any] = {"available": True, "reason": None, "provider": None}
        report["backends"][backend] = info
        if backend == "eager":
            report["results"] += _verify_eager(contents, info, tolerance, scale)
        else:
            report["results"] += _verify_graphs(backend, contents, info, tolerance, scale)
    report["passed"] = bool(report["results"]) and all(r["passed"] for r in report["results"])
    if not report["results"]:
        report["status"] = "nothing_verified"
    elif not report["passed"]:
        report["status"] = "parity_mismatch"
    report["wall_time_s"] = time.perf_counter() - start
    return report
