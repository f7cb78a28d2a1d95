"""``ptycho-runtime info``: what the runtime sees in a bundle, and where it would run.

``bundle_report(path)`` is the work (a JSON-serialisable dict, callable
without argv); ``cmd_info`` prints it as text or JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from .. import format as fmt
from .._version import __version__
from .common import EPILOG, EXIT_OK, UsageError


def bundle_report(path: str) -> dict[str, Any]:
    """What the runtime sees in a bundle (everything JSON-serialisable)."""
    from ..inference.backends import import_onnxruntime

    try:
        ort = import_onnxruntime()
    except ImportError as exc:
        raise UsageError(str(exc)) from None

    contents = fmt.read_bundle(path)
    p = contents.params
    graphs = []
    for (kind, model), rec in sorted(contents.graphs.items()):
        meta = rec.metadata
        parity = meta.get("parity") or {}
        graphs.append({
            "kind": kind,
            "model": model,
            "size_bytes": len(rec.data),
            "parity_max_rel": parity.get("max_rel"),
            "parity_passed": parity.get("passed"),
            "exporter": meta.get("exporter"),
            "opset": meta.get("opset"),
        })
    report: dict[str, Any] = {
        "path": str(contents.path),
        "format_version": int(contents.header.get("format_version", 0)),
        "producer": contents.header.get("producer"),
        "created_utc": contents.header.get("created_utc"),
        "N": p.get("N"),
        "gridsize": p.get("gridsize"),
        "intensity_scale": p.get("intensity_scale"),
        "output_mode": p.get("output_mode", "amp_phase"),
        "nphotons": p.get("nphotons"),
        "probe": probe_summary(p.get("probe")),
        "models": sorted(contents.state_dicts),
        "parity_cases": sorted(contents.parity),
        "graphs": graphs,
        "runtime": {
            "ptycho_runtime_version": __version__,
            "onnxruntime_version": ort.__version__,
            "available_providers": list(ort.get_available_providers()),
            "torch_installed": _torch_installed(),
        },
    }
    from ..inference.bundle import Bundle

    try:
        b = Bundle(contents)  # the defaults of load_bundle, without reading the file again
        report["default_load"] = {"backend": b.backend, "device": b.device, "precision": b.precision,
                                  "providers": b.providers}
    except fmt.BundleError as exc:
        if not isinstance(exc, fmt.BundleGraphMissingError):
            raise  # a damaged, hostile or inconsistent bundle is an error (exit 2/4), not a report line
        report["default_load"] = {"error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # noqa: BLE001 - reported, not fatal: info must work on bundles the runtime cannot run
        report["default_load"] = {"error": f"{type(exc).__name__}: {exc}"}
    return report


def probe_summary(probe: Any) -> dict[str, Any] | None:
    """What a user compares with their scan's probe: size, energy, centre and the 90%-energy diameter (pixels).

    The network was trained through this probe; a scan whose probe differs
    (``ptycho-runtime infer`` says by how much) is outside what it saw.
    """
    if probe is None:
        return None
    P = np.asarray(probe)
    intensity = np.abs(P.astype(np.complex128)) ** 2
    total = float(intensity.sum())
    if not total > 0:
        return {"shape": list(P.shape), "energy": total}
    yy, xx = np.indices(P.shape)
    cy, cx = float((yy * intensity).sum() / total), float((xx * intensity).sum() / total)
    r = np.hypot(yy - cy, xx - cx).ravel()
    order = np.argsort(r)
    inside = np.cumsum(intensity.ravel()[order]) / total
    radius90 = float(r[order][np.searchsorted(inside, 0.9)])
    return {"shape": list(P.shape), "energy": total, "centre_px": [cx, cy], "diameter_90_px": 2 * radius90,
            "peak_fraction": float(intensity.max() / total)}


def _torch_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _format_report(r: dict[str, Any]) -> str:
    lines = [
        f"bundle           {r['path']}",
        f"format version   {r['format_version']}  ({r.get('producer')}, {r.get('created_utc')})",
        f"N                {r['N']}",
        f"gridsize         {r['gridsize']}",
        f"intensity_scale  {r['intensity_scale']}",
        f"output_mode      {r['output_mode']}",
        f"nphotons         {r['nphotons']}  (photons per frame the model was trained at)",
        f"training probe   {_probe_line(r['probe'])}",
        f"eager models     {', '.join(r['models']) or 'none'}",
        "graphs:",
    ]
    if not r["graphs"]:
        lines.append("  (none: add graphs with ptycho-export)")
    for g in r["graphs"]:
        par = g["parity_max_rel"]
        par_s = "n/a" if par is None else f"{par:.2e}" + ("" if g["parity_passed"] in (None, True) else " FAILED")
        lines.append(f"  {g['kind'] + '/' + g['model']:<32} {g['size_bytes'] / 2**20:8.2f} MiB  parity max rel {par_s}")
    rt = r["runtime"]
    lines += [
        f"onnxruntime      {rt['onnxruntime_version']}  providers: {', '.join(rt['available_providers'])}",
        f"torch installed  {'yes' if rt['torch_installed'] else 'no'}",
    ]
    d = r["default_load"]
    if "error" in d:
        lines.append(f"default load     cannot run: {d['error']}")
    else:
        lines.append(f"default load     backend={d['backend']} device={d['device']} precision={d['precision']} "
                     f"providers={', '.join(d['providers'])}")
    return "\n".join(lines)


def _probe_line(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "none stored"
    if "centre_px" not in summary:
        return f"{summary['shape']}, all zero"
    cx, cy = summary["centre_px"]
    return (f"{summary['shape'][0]}x{summary['shape'][1]}, sum |P|^2 {summary['energy']:.4g}, centre ({cx:.1f}, "
            f"{cy:.1f}) px, 90% of its energy within {summary['diameter_90_px']:.1f} px")


def cmd_info(args: argparse.Namespace) -> int:
    report = bundle_report(args.bundle)
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True, default=str))
    else:
        print(_format_report(report))
    return EXIT_OK

def add_info_command(sub: argparse._SubParsersAction) -> None:
    """The ``info`` subcommand and its options."""
    p = sub.add_parser("info", help="what the runtime sees in a bundle, and where it would run",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file (wts.h5) or the folder holding it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_info)
