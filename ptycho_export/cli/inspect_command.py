"""``ptycho-export inspect BUNDLE``: what a bundle holds, as plain data (``inspect_bundle``) or text.

torch-free: the bundle is read with the runtime's reader (checksums verified
on the way), so ``inspect`` starts quickly and runs where torch is absent.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping, Optional

import numpy as np

from .errors import EXIT_OK
from .output import err_cell, mib, plain, print_json, secs, table

PARAM_KEYS = ("N", "gridsize", "intensity_scale", "n_filters_scale", "amp_activation", "output_mode", "nphotons",
              "object.big", "probe.big")


def _history_summary(history: Mapping[str, np.ndarray], training: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"epochs": 0}
    loss = np.asarray(history.get("loss", []), dtype=np.float64)
    if loss.size:
        out.update(epochs=int(loss.size), first_loss=float(loss[0]), last_loss=float(loss[-1]),
                   best_loss=float(loss.min()), best_loss_epoch=int(np.argmin(loss)) + 1)
    val = np.asarray(history.get("val_loss", []), dtype=np.float64)
    if val.size:
        out.update(first_val_loss=float(val[0]), last_val_loss=float(val[-1]), best_val_loss=float(val.min()),
                   best_val_loss_epoch=int(np.argmin(val)) + 1)
    for key in ("epochs_run", "wall_time_s", "device", "n_train", "n_val", "intensity_scale",
                "trained_intensity_scale"):
        if key in training:
            out[key] = training[key]
    out["metrics"] = sorted(history)
    return out


def _graph_info(contents: Any) -> dict[str, Any]:
    graphs = {}
    for (kind, model), rec in sorted(contents.graphs.items()):
        meta = rec.metadata
        parity = meta.get("parity") or {}
        graphs[f"{kind}/{model}"] = {
            "kind": kind, "model": model, "size_bytes": len(rec.data), "method": meta.get("method"),
            "exporter": meta.get("exporter"), "opset": meta.get("opset"),
            "inputs": [i.get("name") for i in meta.get("inputs", [])],
            "outputs": [o.get("name") for o in meta.get("outputs", [])],
            "max_rel_error": parity.get("max_rel"), "tolerance_rel": parity.get("tolerance_rel"),
            "parity_passed": parity.get("passed"), "export_time_s": meta.get("export_time_s"),
            "torch_version": meta.get("torch_version"), "sha256": meta.get("sha256"),
        }
    return graphs


def inspect_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """Everything ``inspect`` shows, as plain data."""
    from ptycho_runtime import format as fmt
    from ptycho_runtime.inference.parity import case_batch

    bundle_path = fmt.resolve_bundle_path(path)
    contents = fmt.read_bundle(bundle_path)  # the reader policy; the file is not opened again
    header = contents.header
    n_params: dict[str, Optional[int]] = dict(contents.n_parameters)
    params = contents.params
    probe = params.get("probe")
    info: dict[str, Any] = {
        "bundle": str(bundle_path),
        "file_size_bytes": contents.file_size,
        "format": header.get("format"),
        "format_version": header.get("format_version"),
        "producer": header.get("producer"),
        "created_utc": header.get("created_utc"),
        "versions": {k[: -len("_version")]: v for k, v in header.items()
                     if k.endswith("_version") and k != "format_version"},
        "params": {k: params.get(k) for k in PARAM_KEYS},
        "probe": None if probe is None else {"shape": list(np.shape(probe)), "dtype": str(np.asarray(probe).dtype)},
        "models": {name: {"class": contents.architectures.get(name, {}).get("class"),
                          "n_parameters": n_params.get(name),
                          "n_tensors": len(sd)}
                   for name, sd in sorted(contents.state_dicts.items())},
        "graphs": _graph_info(contents),
        "parity_cases": {case: case_batch(v) for case, v in sorted(contents.parity.items())},
        "training": _history_summary(contents.history, contents.training),
    }
    return plain(info)


def _training_line(t: Mapping[str, Any]) -> str:
    if not t.get("epochs"):
        return "Training  no history stored"
    line = (f"Training  {t['epochs']} epoch(s)"
            + (f" on {t['device']}" if t.get("device") else "")
            + (f" in {t['wall_time_s']:.1f} s" if t.get("wall_time_s") is not None else "")
            + f"; loss first {t['first_loss']:.5g}, last {t['last_loss']:.5g}, "
              f"best {t['best_loss']:.5g} (epoch {t['best_loss_epoch']})")
    if "last_val_loss" in t:
        line += f"; val_loss last {t['last_val_loss']:.5g}, best {t['best_val_loss']:.5g}"
    return line


def print_inspect(info: Mapping[str, Any]) -> None:
    print(f"Bundle    {info['bundle']} ({mib(info['file_size_bytes'])} MiB)")
    print(f"Format    {info['format']} v{info['format_version']}, written by {info['producer']} "
          f"at {info['created_utc']}")
    if info["versions"]:
        print("Versions  " + ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items())))
    print("Params    " + "  ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in info["params"].items()))
    if info["probe"]:
        print(f"Probe     {info['probe']['dtype']} {info['probe']['shape']}")
    print("Models    " + ("none (no eager weights)" if not info["models"] else ""))
    if info["models"]:
        print(table(["model", "class", "parameters", "tensors"],
                    [[name, m["class"], "-" if m["n_parameters"] is None else f"{m['n_parameters']:,}",
                      m["n_tensors"]] for name, m in info["models"].items()], indent="  "))
    print("Graphs    " + ("none (add them with: ptycho-export BUNDLE)" if not info["graphs"] else ""))
    if info["graphs"]:
        print(table(["graph", "method", "opset", "size MiB", "max rel err", "tolerance", "export s"],
                    [[name, g["method"], g["opset"], mib(g["size_bytes"]), err_cell(g["max_rel_error"]),
                      err_cell(g["tolerance_rel"]), secs(g["export_time_s"])] for name, g in info["graphs"].items()],
                    indent="  "))
    if info["parity_cases"]:
        print("Parity    " + ", ".join(f"{c} (batch {b})" for c, b in info["parity_cases"].items()))
    print(_training_line(info["training"]))


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_bundle(args.bundle)  # FileNotFoundError / BundleError → exit 2, checksum → 4
    if args.json:
        print_json(info)
    else:
        print_inspect(info)
    return EXIT_OK
