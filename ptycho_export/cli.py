"""``ptycho-export``: compile graphs into a bundle, inspect it, verify it, or train a model.

    ptycho-export BUNDLE.h5              add TorchScript + ONNX graphs (same as: ptycho-export bundle BUNDLE)
    ptycho-export inspect BUNDLE [--json]
    ptycho-export verify BUNDLE [--json]
    ptycho-export train --simulate lines --output-dir out/
    ptycho-export evaluate BUNDLE SCAN.npz [--reference [epie|lsqml]] [--json] [-o REPORT.json] [--figure FIG.png]

Heavy imports (torch, onnx, matplotlib) happen inside the commands that need
them, so ``inspect`` and ``--help`` start quickly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ptycho_runtime.bundle_format import DEFAULT_OPSET  # torch-free homes: --help never imports torch
from ptycho_runtime.parity import DEFAULT_TOLERANCE as PARITY_TOLERANCE

from . import __version__

PROG = "ptycho-export"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARITY, EXIT_CHECKSUM = 0, 1, 2, 3, 4
COMMANDS = ("bundle", "inspect", "verify", "train", "evaluate")
DEFAULT_NPHOTONS = 1e9
DEFAULT_PRETRAIN = 0.9
PARAM_KEYS = ("N", "gridsize", "intensity_scale", "n_filters_scale", "amp_activation", "output_mode", "nphotons",
              "object.big", "probe.big")

EPILOG = """\
commands:
  BUNDLE | bundle BUNDLE   compile TorchScript and ONNX graphs into the bundle (idempotent; --force refreshes)
  inspect BUNDLE           format, producer, params, models, graphs and training history
  verify BUNDLE            checksums, then every graph on every backend available here vs the stored eager outputs
  train ...                train a model on an NPZ scan or a simulated one, write the bundle and a report
  evaluate BUNDLE SCAN     score the bundle's reconstruction of SCAN against its true object [--reference]

BUNDLE is a bundle file (wts.h5) or a folder that holds wts.h5.

exit codes:
  0  success
  1  unexpected error (run with --debug for the traceback)
  2  usage error or bad input file (missing file, not a bundle, bundle without eager weights, bad NPZ,
     evaluate: no objectGuess in the scan, --reference without pty-chi)
  3  parity mismatch: a compiled graph does not reproduce the eager model
  4  checksum failure: the bundle is damaged or was modified
"""



def _exit_codes(*lines: str) -> str:
    """A subcommand's epilog: the exit codes it can return (0, 1 and 2 always)."""
    return "\n".join(["exit codes:", "  0  success", "  1  unexpected error (run with --debug for the traceback)",
                      *lines])


BUNDLE_EXITS = _exit_codes(
    "  2  bad input: missing file, not a bundle, no eager weights, unsupported --opset",
    "  3  parity mismatch: a compiled graph does not reproduce the eager model (nothing is written)",
    "  4  checksum failure: the bundle is damaged or was modified")
INSPECT_EXITS = _exit_codes("  2  bad input: missing file, not a bundle",
                            "  4  checksum failure: the bundle is damaged or was modified")
VERIFY_EXITS = _exit_codes("  2  bad input: missing file, not a bundle, no parity vectors, nothing to verify",
                           "  3  parity mismatch on some backend",
                           "  4  checksum failure: the bundle is damaged or was modified")
TRAIN_EXITS = _exit_codes("  2  bad input: an option, or an NPZ scan refused by a unit guard (docs/data.md)",
                          "  3  trained and saved, but a compiled graph failed parity (stored without graphs)")
EVALUATE_EXITS = _exit_codes("  2  bad input: not a bundle, bad NPZ, no objectGuess in the scan, --reference without "
                             "pty-chi",
                             "  4  checksum failure: the bundle is damaged or was modified")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout (exit-code tables); defaults are written into each option's help."""


class CliError(Exception):
    """An error the user can fix; printed as one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- output helpers


def _plain(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays → Python, non-finite floats → None, paths → str."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, complex):
        return {"real": _plain(obj.real), "imag": _plain(obj.imag)}
    return obj


def _print_json(obj: Any) -> None:
    print(json.dumps(_plain(obj), indent=2, sort_keys=False, allow_nan=False))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "") -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(indent + line for line in lines)


def _err(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return "inf" if not math.isfinite(x) else f"{x:.2e}"


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _secs(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def _resolve_bundle(path: str) -> Path:
    from ptycho_runtime.bundle_format import resolve_bundle_path

    return resolve_bundle_path(path)  # FileNotFoundError with a clear message → exit 2


# --------------------------------------------------------------------------- bundle (add graphs)


def _check_opset(opset: int) -> None:
    import onnx

    top = onnx.defs.onnx_opset_version()
    if not 18 <= opset <= top:
        raise CliError(f"--opset {opset} is not supported: the torch.export ONNX exporter needs opset 18 or newer, "
                       f"and the installed onnx {onnx.__version__} knows opsets up to {top}")


def _graph_rows(summary: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for name, g in summary["graphs"].items():
        method = g.get("method") or "-"
        if g.get("opset"):
            method = f"{method} (opset {g['opset']})"
        rows.append([name, method, _mib(g.get("size_bytes")), _err(g.get("max_rel_error")),
                     _secs(g.get("export_time_s")), "refreshed" if g.get("refreshed") else "kept"])
    return rows


def cmd_bundle(args: argparse.Namespace) -> int:
    from ptycho_runtime.bundle_format import check_bundle_file

    if args.no_torchscript and args.no_onnx:
        raise CliError("--no-torchscript and --no-onnx together leave nothing to compile")
    if not args.no_onnx:
        _check_opset(args.opset)  # options first (no file needed), then the file, then torch
    path = check_bundle_file(args.bundle)  # a wrong file fails here, in milliseconds, before torch is imported
    from .export import add_graphs_to_bundle

    summary = add_graphs_to_bundle(path, opset=args.opset, torchscript=not args.no_torchscript,
                                   onnx=not args.no_onnx, force=args.force, tolerance=args.tolerance)
    if args.json:
        _print_json(summary)
        return EXIT_OK
    print(f"Bundle {summary['bundle']}")
    print(_table(["graph", "method", "size MiB", "max rel err vs eager", "export s", "status"],
                 _graph_rows(summary)))
    n = sum(1 for g in summary["graphs"].values() if g["refreshed"])
    if summary["written"]:
        print(f"Compiled and stored {n} graph(s) in {summary['export_time_s']:.1f} s "
              f"(parity tolerance {args.tolerance:g}, relative).")
    else:
        print("Nothing to do: every requested graph is already in the bundle (use --force to re-export).")
    stale = [name for name, g in summary["graphs"].items()
             if not g["refreshed"] and g.get("opset") not in (None, args.opset) and not args.no_onnx]
    if stale:
        print(f"Note: {', '.join(stale)} were kept at their original opset; --force re-exports them at "
              f"opset {args.opset}.")
    return EXIT_OK


# --------------------------------------------------------------------------- inspect


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


def inspect_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """Everything ``inspect`` shows, as plain data."""
    from ptycho_runtime import bundle_format as fmt
    from ptycho_runtime.parity import case_batch

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
        "graphs": {},
        "parity_cases": {case: case_batch(v) for case, v in sorted(contents.parity.items())},
        "training": _history_summary(contents.history, contents.training),
    }
    for (kind, model), rec in sorted(contents.graphs.items()):
        meta = rec.metadata
        parity = meta.get("parity") or {}
        info["graphs"][f"{kind}/{model}"] = {
            "kind": kind, "model": model, "size_bytes": len(rec.data), "method": meta.get("method"),
            "exporter": meta.get("exporter"), "opset": meta.get("opset"),
            "inputs": [i.get("name") for i in meta.get("inputs", [])],
            "outputs": [o.get("name") for o in meta.get("outputs", [])],
            "max_rel_error": parity.get("max_rel"), "tolerance_rel": parity.get("tolerance_rel"),
            "parity_passed": parity.get("passed"), "export_time_s": meta.get("export_time_s"),
            "torch_version": meta.get("torch_version"), "sha256": meta.get("sha256"),
        }
    return _plain(info)


def _print_inspect(info: Mapping[str, Any]) -> None:
    print(f"Bundle    {info['bundle']} ({_mib(info['file_size_bytes'])} MiB)")
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
        print(_table(["model", "class", "parameters", "tensors"],
                     [[name, m["class"], "-" if m["n_parameters"] is None else f"{m['n_parameters']:,}",
                       m["n_tensors"]] for name, m in info["models"].items()], indent="  "))
    print("Graphs    " + ("none (add them with: ptycho-export BUNDLE)" if not info["graphs"] else ""))
    if info["graphs"]:
        print(_table(["graph", "method", "opset", "size MiB", "max rel err", "tolerance", "export s"],
                     [[name, g["method"], g["opset"], _mib(g["size_bytes"]), _err(g["max_rel_error"]),
                       _err(g["tolerance_rel"]), _secs(g["export_time_s"])] for name, g in info["graphs"].items()],
                     indent="  "))
    if info["parity_cases"]:
        print("Parity    " + ", ".join(f"{c} (batch {b})" for c, b in info["parity_cases"].items()))
    t = info["training"]
    if t.get("epochs"):
        line = (f"Training  {t['epochs']} epoch(s)"
                + (f" on {t['device']}" if t.get("device") else "")
                + (f" in {t['wall_time_s']:.1f} s" if t.get("wall_time_s") is not None else "")
                + f"; loss first {t['first_loss']:.5g}, last {t['last_loss']:.5g}, "
                  f"best {t['best_loss']:.5g} (epoch {t['best_loss_epoch']})")
        if "last_val_loss" in t:
            line += f"; val_loss last {t['last_val_loss']:.5g}, best {t['best_val_loss']:.5g}"
        print(line)
    else:
        print("Training  no history stored")


def cmd_inspect(args: argparse.Namespace) -> int:
    _resolve_bundle(args.bundle)
    info = inspect_bundle(args.bundle)
    if args.json:
        _print_json(info)
    else:
        _print_inspect(info)
    return EXIT_OK


# --------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    from ptycho_runtime.bundle_format import check_bundle_file

    check_bundle_file(args.bundle)  # before torch is imported
    from .verify import verify_bundle

    report = verify_bundle(args.bundle, backends=args.backend, tolerance=args.tolerance)
    if args.json:
        _print_json(report)
    else:
        print(f"Bundle    {report['bundle']}")
        print("Checksums " + ("ok (every dataset matches its sha256)" if report["checksum"]["ok"]
                              else f"FAILED: {report['checksum']['error']}"))
        if report["cases"]:
            print("Cases     " + ", ".join(f"{c} (batch {b})" for c, b in report["cases"].items()))
        if report["results"]:
            print(_table(["backend", "graph", "max rel err", "max abs err", "tolerance", "result"],
                         [[r["backend"], r["graph"], _err(r["max_rel"]), _err(r["max_abs"]),
                           _err(r["tolerance_rel"]),
                           "pass" if r["passed"] else ("ERROR" if r["error"] else "FAIL")]
                          for r in report["results"]]))
        for name, b in report["backends"].items():
            if not b["available"]:
                print(f"skipped {name}: {b['reason']}")
        for r in report["results"]:
            if r["error"]:
                print(f"{r['backend']}/{r['graph']}: {r['error']}")
        print("Result    " + ("PASSED" if report["passed"] else report["status"].replace("_", " ").upper()))
    if not report["checksum"]["ok"]:
        _error_line(f"checksum failure: {report['checksum']['error']}")
        return EXIT_CHECKSUM
    if report["status"] == "nothing_verified":
        raise CliError(f"nothing to verify in {report['bundle']}: no eager weights and no graphs")
    if not report["passed"]:
        bad = [r for r in report["results"] if not r["passed"]]
        worst = bad[0]
        detail = worst["error"] or (f"relative error {_err(worst['max_rel'])} on {worst.get('worst_output')} > "
                                    f"tolerance {_err(worst['tolerance_rel'])}")
        _error_line(f"parity mismatch in {len(bad)} backend/graph pair(s); first: "
                    f"{worst['backend']}/{worst['graph']}: {detail}")
        return EXIT_PARITY
    return EXIT_OK


# --------------------------------------------------------------------------- train


def _read_scan(path: Path, args: argparse.Namespace, what: str):
    """A user's NPZ scan with the declared units and centre convention; CliError naming the option on failure."""
    from .data import load_npz

    try:
        return load_npz(path, units="counts" if args.counts else args.units, position_centre=args.position_centre)
    except ValueError as exc:
        raise CliError(f"cannot use {what} {path}: {exc}") from None


def _scan_description(path: Path, data) -> str:
    units = (f"{data.nphotons:.3g} photons/frame on average" if data.nphotons is not None
             else "normalised amplitudes")
    return f"NPZ `{path}` ({data.n} patterns, N={data.N}, {units})"


def _load_training_data(args: argparse.Namespace):
    """(train data, held-out data or None, truth of the held-out scan or None, description)."""
    from .data import simulate_scan

    if (args.product is None) != (args.patterns is None):
        raise CliError("--product and --patterns go together: a ptychodus product file and its diffraction file")
    if args.product is not None:
        from .data.npz import load_ptychodus

        if args.counts or args.units != "auto":
            raise CliError("--counts and --units do not apply to --product: ptychodus patterns are counts")
        try:
            data = load_ptychodus(args.product, args.patterns)
        except (ValueError, FileNotFoundError) as exc:
            raise CliError(f"cannot use --product {args.product} --patterns {args.patterns}: {exc}") from None
        desc = (f"ptychodus `{args.product}` + `{args.patterns}` ({data.n} patterns, N={data.N}, "
                f"{data.nphotons:.3g} photons/frame on average)")
        test = _read_scan(args.test_data, args, "--test-data") if args.test_data is not None else None
        return data, test, desc
    if args.data is not None:
        if args.n_positions is not None or args.object_size is not None or args.step is not None:
            raise CliError("--n-positions, --object-size and --step only apply to --simulate")
        data = _read_scan(args.data, args, "--data")
        if args.N is not None and args.N != data.N:
            raise CliError(f"--N {args.N} does not match the data: {args.data} holds {data.N}x{data.N} patterns")
        desc = _scan_description(args.data, data)
        test = None
        if args.test_data is not None:
            test = _read_scan(args.test_data, args, "--test-data")
            if test.N != data.N:
                raise CliError(f"--test-data holds {test.N}x{test.N} patterns but --data holds {data.N}x{data.N}")
            desc += f"; held out: {_scan_description(args.test_data, test)}"
        return data, test, desc
    if args.counts or args.units != "auto" or args.test_data is not None:
        raise CliError("--counts, --units and --test-data only apply to --data")
    N = 64 if args.N is None else args.N
    kwargs: dict[str, Any] = dict(N=N, object_kind=args.simulate, nphotons=args.nphotons or DEFAULT_NPHOTONS,
                                  seed=args.seed, object_size=args.object_size)
    if args.n_positions is not None:
        if args.step is not None:
            raise CliError("--step sets a raster scan; --n-positions a random one: give one of them")
        kwargs.update(scan="random", n_positions=args.n_positions)
    elif args.step is not None:
        kwargs.update(step=args.step)
    try:
        data = simulate_scan(**kwargs)
    except ValueError as exc:
        raise CliError(f"cannot simulate the scan: {exc}") from None
    scan = f"{args.n_positions} random positions" if args.n_positions else f"a raster of {data.n} positions"
    desc = (f"simulated `{args.simulate}` object ({data.object.shape[0]}x{data.object.shape[1]} px), {scan}, "
            f"N={N}, nphotons {kwargs['nphotons']:g}, seed {args.seed}")
    return data, None, desc


def _quality_rows(quality: Mapping[str, Optional[dict]]) -> list[str]:
    lines = ["| region | pixels | amplitude PSNR (dB) | phase PSNR (dB) | amplitude corr. | phase corr. |",
             "|---|---|---|---|---|---|"]
    for region, q in quality.items():
        if q is None:
            continue
        lines.append(f"| {region} | {q['n_pixels']} | {q['amplitude_psnr_db']:.2f} | {q['phase_psnr_db']:.2f} | "
                     f"{q['amplitude_correlation']:.4f} | {q['phase_correlation']:.4f} |")
    return lines


def cmd_train(args: argparse.Namespace) -> int:
    from . import params
    from .config import ModelConfig, TrainingConfig

    start = time.perf_counter()
    out_dir = Path(args.output_dir)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    def make_config(N: int, nphotons: float, fixed_scale: bool) -> TrainingConfig:
        try:
            model_cfg = ModelConfig(N=N, gridsize=args.gridsize, n_filters_scale=args.n_filters_scale,
                                    intensity_scale_trainable=not fixed_scale,
                                    input_backprojection=args.backprojection, output_mode=args.output_mode)
            budget = None if args.time_budget is None else args.time_budget * 60.0
            return TrainingConfig(model=model_cfg, nepochs=args.epochs, batch_size=args.batch_size,
                                  learning_rate=args.lr, nphotons=nphotons, seed=args.seed,
                                  device=args.device, output_dir=out_dir, train_data_file=args.data,
                                  test_data_file=args.test_data, progress=True, export_graphs=False,
                                  time_budget_s=budget, lr_schedule=args.lr_schedule,
                                  pretrain_fraction=args.pretrain if budget is not None else 0.0,
                                  val_fraction=args.val_fraction,
                                  command=getattr(args, "command_line", None))
        except ValueError as exc:
            raise CliError(str(exc)) from None

    if args.pretrain is not None and args.time_budget is None:
        raise CliError("--pretrain is a share of the time budget: give --time-budget MINUTES as well")
    if args.pretrain is None:
        args.pretrain = DEFAULT_PRETRAIN if args.time_budget is not None else 0.0
    make_config(64 if args.N is None else args.N, args.nphotons or DEFAULT_NPHOTONS, False)  # validate options first
    if not 0.0 < args.train_fraction <= 1.0:
        raise CliError(f"--train-fraction must be in (0, 1] (got {args.train_fraction})")
    params.reset_cfg()  # a fresh start, whatever an earlier in-process command left in params.cfg
    data, test, data_desc = _load_training_data(args)
    split = "all positions"
    if test is not None or args.train_fraction == 1.0:
        train = data
    else:
        try:
            train, test = data.split(fraction=args.train_fraction, mode="spatial")
        except ValueError as exc:
            raise CliError(f"--train-fraction {args.train_fraction}: {exc}") from None
        split = f"spatial split {args.train_fraction:g}"
    physics = dict(train.physics or {})
    for key, value in (("photon_energy_eV", args.photon_energy_ev), ("detector_distance_m", args.detector_distance_m),
                       ("detector_pixel_size_m", args.detector_pixel_size_m),
                       ("object_pixel_size_m", args.object_pixel_size_m)):
        if value is not None:
            if not (np.isfinite(value) and value > 0):
                raise CliError(f"--{key.replace('_', '-').lower()} must be > 0 (got {value})")
            physics[key] = float(value)
    train.physics = physics or None
    truth = test.object if test is not None else None
    # The data's own photon count, when its units tell it, is exact: the intensity scale is then fixed.
    nphotons = args.nphotons or train.nphotons or DEFAULT_NPHOTONS
    config = make_config(data.N, nphotons, fixed_scale=args.nphotons is None and train.nphotons is not None)
    model_cfg = config.model
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CliError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"--output-dir {out_dir} exists and is not a folder")

    from .workflows.components import run_cdi_example_torch

    n_test = 0 if test is None else test.n
    print(f"Training on {data_desc}: {train.n} train / {n_test} test patterns ({split})", flush=True)
    _, _, results = run_cdi_example_torch(train, test, config, do_stitching=True)
    bundle_path = Path(results["bundle_path"])
    history = {k: [float(v) for v in vals] for k, vals in results["history"].items()}
    summary = results["training_summary"]
    print(f"Trained {summary.get('epochs_run', len(history.get('loss', [])))} epoch(s) on {summary.get('device')} "
          f"in {summary.get('wall_time_s', float('nan')):.1f} s; bundle {bundle_path}")

    exit_code, graph_note, export_summary = EXIT_OK, "not compiled (--no-graphs)", None
    if not args.no_graphs:
        from .export import ParityError, add_graphs_to_bundle

        try:
            export_summary = add_graphs_to_bundle(bundle_path)
        except ParityError as exc:
            exit_code, graph_note = EXIT_PARITY, f"NOT stored: {exc}"
            _error_line(str(exc))
        else:
            print(_table(["graph", "method", "size MiB", "max rel err vs eager", "export s", "status"],
                         _graph_rows(export_summary)))
            graph_note = ", ".join(f"{name} ({_mib(g['size_bytes'])} MiB, max rel err {_err(g['max_rel_error'])})"
                                   for name, g in export_summary["graphs"].items())

    recon = results.get("reconstruction")
    quality: dict[str, Optional[dict]] = {}
    if recon is not None and truth is not None:
        from .metrics import reconstruction_quality

        for region, kwargs in (("all covered pixels", {}), ("central region", {"border": data.N // 4})):
            try:
                quality[region] = reconstruction_quality(recon, truth, **kwargs)
            except ValueError:
                quality[region] = None
    title = f"test-region reconstruction ({test.n} patterns)"
    if quality.get("all covered pixels"):
        q = quality["all covered pixels"]
        title += f" — PSNR amplitude {q['amplitude_psnr_db']:.1f} dB, phase {q['phase_psnr_db']:.1f} dB"
    from .data import save_npz

    files = [bundle_path]
    if test is not None:
        save_npz(out_dir / "test_scan.npz", test)  # the held-out scan, for ptycho-runtime infer
        files.append(out_dir / "test_scan.npz")
    if recon is not None:
        from ptycho_runtime.cli import write_png  # one plot for both CLIs (atomic write, colour bars)

        write_png(out_dir / "reconstruction.png", recon, title)
        files.append(out_dir / "reconstruction.png")
    (out_dir / "history.json").write_text(json.dumps({"epochs": len(history.get("loss", [])), **history},
                                                     indent=1) + "\n")
    files.append(out_dir / "history.json")

    wall = time.perf_counter() - start
    loss, val = history.get("loss", []), history.get("val_loss", [])
    lines = [
        "# ptycho-export training report", "",
        f"- **Data**: {data_desc}; {split}: {train.n} train / {n_test} test patterns",
        f"- **Model**: N={data.N}, gridsize={args.gridsize}, n_filters_scale={args.n_filters_scale}, "
        f"output_mode {model_cfg.output_mode}, amp_activation {model_cfg.amp_activation}, "
        f"input back-projection {'on' if model_cfg.input_backprojection else 'off'}; "
        f"intensity_scale {results['intensity_scale']:.6g}",
        f"- **Training**: {len(loss)} epoch(s) of {args.epochs} allowed"
        + (f" in a {args.time_budget:g}-minute budget (stopped by: {summary.get('stop_reason')})"
           if args.time_budget else "")
        + (f", after {summary['pretraining']['steps']} supervised pre-training steps "
           f"({summary['pretraining']['wall_time_s']:.0f} s)" if "pretraining" in summary else "")
        + f", batch {args.batch_size}, lr {args.lr:g} ({args.lr_schedule}), "
        f"nphotons {nphotons:g}, seed {args.seed}, device {summary.get('device')}, "
        f"{summary.get('n_train')} train / {summary.get('n_val')} validation groups",
        f"- **Wall time**: {wall:.1f} s in all, training {summary.get('wall_time_s', float('nan')):.1f} s",
    ]
    if loss:
        lines.append(f"- **Final losses**: loss {loss[-1]:.6g}" + (f", val_loss {val[-1]:.6g}" if val else "")
                     + f" (best loss {min(loss):.6g})")
    lines.append(f"- **Bundle**: `{bundle_path.name}`; graphs: {graph_note}")
    if quality:
        lines += ["", "## Quality vs ground truth (test region, global phase offset removed)", ""]
        lines += _quality_rows(quality)
        q = quality.get("all covered pixels")
        if q:
            lines += ["", f"Removed global phase offset: {q['phase_offset_rad']:.4f} rad."]
    elif test is None:
        lines += ["", "No held-out scan (--train-fraction 1 without --test-data): no quality metrics."]
    elif truth is None:
        lines += ["", "No ground truth (the held-out scan has no objectGuess): no quality metrics."]
    if recon is not None:
        lines += ["", "![reconstruction](reconstruction.png)"]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    files.append(out_dir / "report.md")
    if quality.get("all covered pixels"):
        q = quality["all covered pixels"]
        print(f"Quality vs ground truth: amplitude PSNR {q['amplitude_psnr_db']:.2f} dB "
              f"(corr {q['amplitude_correlation']:.3f}), phase PSNR {q['phase_psnr_db']:.2f} dB "
              f"(corr {q['phase_correlation']:.3f})")
    print("Wrote " + ", ".join(str(p) for p in files))
    return exit_code


# --------------------------------------------------------------------------- evaluate

EVALUATE_ROWS = (
    ("phase SSIM", "phase_ssim", "{:.3f}"),
    ("phase RMSE (rad)", "phase_rmse_rad", "{:.4f}"),
    ("phase PSNR (dB)", "phase_psnr_db", "{:.2f}"),
    ("amplitude SSIM", "amplitude_ssim", "{:.3f}"),
    ("amplitude RMSE", "amplitude_rmse", "{:.4f}"),
    ("amplitude PSNR (dB)", "amplitude_psnr_db", "{:.2f}"),
    ("FRC resolution (px, 1/7)", "frc_resolution_px", "{:.2f}"),
)


def _metric_cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf"
    return fmt.format(value)


def _evaluate_table(report: Mapping[str, Any]) -> str:
    methods = [("network", report["network"])]
    if "refined" in report:
        methods.append((f"network + ePIE ({report['refined']['iterations']} it)", report["refined"]))
        methods.append((f"ePIE alone ({report['refine_control']['iterations']} it)", report["refine_control"]))
    if "reference" in report:
        ref = report["reference"]
        methods.append((f"{ref['engine']} ({ref['iterations']} it)", ref))
    rows = []
    for label, key, fmt in EVALUATE_ROWS:
        cells = [_metric_cell(m["metrics"][key], fmt) for _, m in methods]
        if key == "frc_resolution_px":
            cells = [c + (" (Nyquist)" if m["metrics"]["frc_reaches_nyquist"] else "") for c, (_, m) in
                     zip(cells, methods, strict=True)]
        rows.append([label] + cells)
    rows.append(["scored pixels"] + [str(m["metrics"]["n_pixels"]) for _, m in methods])
    rows.append(["shift found (rows, cols px)"] + [
        f"{m['alignment']['found_shift_px']['rows']:+.2f}, {m['alignment']['found_shift_px']['cols']:+.2f}"
        + ("" if m["alignment"]["shift_applied"] or m["alignment"]["found_shift_px"] == {"rows": 0.0, "cols": 0.0}
           else " (not applied)") for _, m in methods])
    rows.append(["wall time (s)"] + [f"{m['wall_time_s']:.2f}" for _, m in methods])
    return _table(["metric"] + [label for label, _ in methods], rows)


def _write_text_atomic(path: Path, text: str) -> None:
    from ptycho_runtime.bundle_format import atomic_write_path

    with atomic_write_path(path) as tmp:
        tmp.write_text(text)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ptycho_runtime.bundle_format import check_bundle_file

    check_bundle_file(args.bundle)  # before torch is imported
    if not Path(args.scan).is_file():
        raise CliError(f"scan {args.scan} not found (give a PtychoPINN NPZ with diffraction, xcoords, ycoords, "
                       "probeGuess and objectGuess)")
    if not 0.0 <= args.min_weight < 1.0:
        raise CliError(f"--min-weight must be in [0, 1) (got {args.min_weight})")
    if args.figure is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--figure needs matplotlib: pip install matplotlib") from None
    from .evaluate import NoGroundTruthError, evaluate, write_figure
    from .reference import DEFAULT_ITERATIONS, ReferenceUnavailableError

    if args.reference:
        its = args.reference_iterations or DEFAULT_ITERATIONS[args.reference]
        print(f"Reconstructing with the network, then with pty-chi {args.reference} ({its} iterations, "
              "known probe) ...", file=sys.stderr, flush=True)
    try:
        ev = evaluate(args.bundle, args.scan, counts=args.counts, reference=args.reference,
                      reference_iterations=args.reference_iterations, reference_batch_size=args.reference_batch_size,
                      min_weight_fraction=args.min_weight, backend=args.backend, register=not args.no_register,
                      refine=args.refine)
    except NoGroundTruthError as exc:
        raise CliError(str(exc)) from None
    except ReferenceUnavailableError as exc:
        raise CliError(f"--reference: {exc}") from None
    except ValueError as exc:
        raise CliError(f"cannot evaluate {args.bundle} on {args.scan}: {exc}") from None
    report = ev.report
    if args.figure is not None:
        name = Path(report["bundle"]).name
        write_figure(args.figure, ev, title=f"{Path(args.scan).name} reconstructed by {name}"
                                            + (f" and {report['reference']['engine']}" if ev.reference else ""))
        report["figure"] = str(args.figure)
    if args.output is not None:
        _write_text_atomic(Path(args.output), json.dumps(_plain(report), indent=2, allow_nan=False) + "\n")
    if args.json:
        _print_json(report)
        return EXIT_OK
    print(f"Evaluated {report['bundle']} on {report['scan']}: {report['n_patterns']} patterns, N={report['N']}, "
          f"gridsize {report['gridsize']}; |probe|^2-weighted stitching; scored where the illumination is "
          f">= {report['min_weight_fraction']:g} of one exposure's peak; registered, global phase removed")
    print(_evaluate_table(report))
    if report.get("speedup") is not None:
        print(f"Speed: the network (inference + stitching) is {report['speedup']:.1f}x faster than "
              f"{report['reference']['engine']} ({report['reference']['iterations']} iterations)"
              + (f"; with its {report['refined']['iterations']} ePIE iterations, {report['refined_speedup']:.1f}x"
                 if "refined_speedup" in report else "") + ".")
    written = [p for p in (args.output, args.figure) if p is not None]
    if written:
        print("Wrote " + ", ".join(str(p) for p in written))
    return EXIT_OK


def _add_evaluate_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from ptycho_runtime.refinement import DEFAULT_REFINE_ITERATIONS

    from .reference import ALGORITHMS, DEFAULT_BATCH_SIZE, DEFAULT_ITERATIONS

    p = sub.add_parser("evaluate", parents=[common], help="score a bundle's reconstruction against the true object",
                       formatter_class=_HelpFormatter, epilog=EVALUATE_EXITS,
                       description="Reconstruct SCAN.npz with the bundle (|probe|^2-weighted stitching), register it "
                                   "to the scan's objectGuess (sub-pixel, global phase removed) and report phase and "
                                   "amplitude RMSE, PSNR, SSIM and FRC resolution (1/7 threshold). With --reference, "
                                   "also reconstruct with pty-chi's ePIE or LSQML (known probe) and compare quality "
                                   "and wall time.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file, or a folder holding wts.h5")
    p.add_argument("scan", metavar="SCAN.npz", help="PtychoPINN NPZ that holds objectGuess (the true object)")
    p.add_argument("--reference", nargs="?", const="epie", default=None, choices=ALGORITHMS,
                   help="also reconstruct with pty-chi (ePIE if no algorithm is named; default: no reference); "
                        "needs pip install 'ptycho-export[reference]'")
    p.add_argument("--reference-iterations", type=_positive_int, default=None, metavar="N",
                   help="pty-chi epochs (default: " + ", ".join(f"{a} {n}" for a, n in DEFAULT_ITERATIONS.items())
                        + ")")
    p.add_argument("--reference-batch-size", type=_positive_int, default=None, metavar="N",
                   help="positions per pty-chi update (default: " + ", ".join(
                       f"{a} {n}" for a, n in DEFAULT_BATCH_SIZE.items()) + ")")
    p.add_argument("--refine", nargs="?", type=_positive_int, const=DEFAULT_REFINE_ITERATIONS, default=0,
                   metavar="N", help="also score the network's object after N ePIE iterations with the known probe "
                                     "(ptycho_runtime.refinement), and the same N iterations from a flat object "
                                     f"(what the network's start is worth; N defaults to {DEFAULT_REFINE_ITERATIONS})")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="REPORT.json",
                   help="write the JSON report (default: none)")
    p.add_argument("--figure", type=Path, default=None, metavar="FIGURE.png",
                   help="write truth / network / reference / error images (default: none)")
    p.add_argument("--min-weight", type=float, default=0.2, metavar="FRACTION",
                   help="score pixels lit by at least this fraction of one exposure's peak |probe|^2 (default 0.2)")
    p.add_argument("--no-register", action="store_true", help="skip the sub-pixel registration to the truth")
    p.add_argument("--counts", action="store_true", help="the NPZ diffraction holds counts, not amplitudes "
                                                         "(default: told from the values)")
    p.add_argument("--backend", choices=("auto", "onnx", "torchscript"), default="auto",
                   help="runtime backend for the network (default auto: ONNX Runtime)")
    p.set_defaults(func=cmd_evaluate)


# --------------------------------------------------------------------------- parser and main


def _error_line(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (got {text})")
    return value


def build_parser() -> argparse.ArgumentParser:
    from ptycho_runtime.cli import add_scan_arguments

    from .config import LR_SCHEDULES, OUTPUT_MODES
    from .verify import BACKENDS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Compile, inspect, verify and train PtychoPINN models stored as pickle-free HDF5 bundles.",
        usage=f"{PROG} [-h] [--version] [--debug] {{BUNDLE,bundle,inspect,verify,train,evaluate}} ...")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")

    p = sub.add_parser("bundle", parents=[common], help="add (or refresh) compiled graphs in a bundle",
                       formatter_class=_HelpFormatter, epilog=BUNDLE_EXITS,
                       description="Compile the bundle's eager models to TorchScript and ONNX, check every graph "
                                   "against the eager model, and store graphs and parity vectors in the bundle "
                                   "(atomically). Graphs already present are kept unless --force.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file, or a folder holding wts.h5")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    p.add_argument("--force", action="store_true", help="re-export graphs that are already present")
    p.add_argument("--no-torchscript", action="store_true", help="do not compile TorchScript graphs")
    p.add_argument("--no-onnx", action="store_true", help="do not compile ONNX graphs")
    p.add_argument("--tolerance", type=_tolerance, default=PARITY_TOLERANCE,
                   help="relative parity tolerance vs eager (default %(default)g)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("inspect", parents=[common], help="show what a bundle holds",
                       formatter_class=_HelpFormatter, epilog=INSPECT_EXITS,
                       description="Show format, producer, params, models, graphs and training history "
                                   "(checksums are verified while reading).")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file, or a folder holding wts.h5")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", parents=[common], help="re-check checksums and graph parity on this machine",
                       formatter_class=_HelpFormatter, epilog=VERIFY_EXITS,
                       description="Verify every checksum, then recompute the stored parity cases with every "
                                   f"backend available here ({', '.join(BACKENDS)}) and compare with the stored "
                                   "eager outputs.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file, or a folder holding wts.h5")
    p.add_argument("--backend", action="append", choices=BACKENDS,
                   help="check only this backend (repeatable; default: all available)")
    p.add_argument("--tolerance", type=_tolerance, default=None,
                   help="relative tolerance for every comparison (default: each graph's export tolerance; "
                        "1e-5 for eager)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("train", parents=[common], help="train a model and write bundle, reconstruction and report",
                       formatter_class=_HelpFormatter, epilog=TRAIN_EXITS,
                       description="Train PtychoPINN on an NPZ scan or a simulated one (split spatially into "
                                   "train/test), write OUTPUT_DIR/wts.h5 (with graphs unless --no-graphs), "
                                   "reconstruction.png, history.json and report.md.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, metavar="SCAN.npz",
                     help="PtychoPINN NPZ scan (see docs/data.md; this, --simulate or --product is required)")
    src.add_argument("--simulate", choices=("lines", "grf"),
                     help="simulate a scan of this object kind (this, --data or --product is required)")
    src.add_argument("--product", type=Path, metavar="PRODUCT.h5",
                     help="ptychodus product file (positions, probe, object grid, metadata); with --patterns "
                          "(needs pip install 'ptycho-runtime[ptychodus]'; this, --data or --simulate is required)")
    p.add_argument("--patterns", type=Path, metavar="DIFFRACTION.h5", default=None,
                   help="ptychodus diffraction file (counts, bad pixels) that goes with --product (default: none)")
    phys = p.add_argument_group("instrument (written to the bundle so the runtime can check a host against it; "
                                "default: what the data says)")
    phys.add_argument("--photon-energy-ev", type=float, default=None, metavar="EV",
                      help="photon energy in eV (default: the data's)")
    phys.add_argument("--detector-distance-m", type=float, default=None, metavar="M",
                      help="sample-detector distance in metres (default: the data's)")
    phys.add_argument("--detector-pixel-size-m", type=float, default=None, metavar="M",
                      help="detector pixel size in metres (default: the data's)")
    phys.add_argument("--object-pixel-size-m", type=float, default=None, metavar="M",
                      help="object pixel size in metres (default: the data's, or λ·distance/(N·pixel))")
    p.add_argument("--test-data", type=Path, metavar="TEST.npz", default=None,
                   help="held-out scan to reconstruct and score (default: the bottom part of --data, see "
                        "--train-fraction)")
    add_scan_arguments(p)
    p.add_argument("--output-dir", type=Path, required=True, metavar="DIR",
                   help="where wts.h5, reconstruction.png, history.json, report.md and test_scan.npz go (required)")
    p.add_argument("--N", type=int, default=None, help="patch size (default: the data's, or 64 when simulating)")
    p.add_argument("--gridsize", type=int, default=1,
                   help="patterns per group, gridsize² (1, 2 or 3; default %(default)s)")
    p.add_argument("--n-filters-scale", type=_positive_int, default=2,
                   help="width multiplier of the U-Net's filters (default %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=10,
                   help="training epochs; with --time-budget, the most allowed (default %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="groups per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default %(default)g)")
    p.add_argument("--nphotons", type=float, default=None,
                   help="photons per frame (default: the data's mean count when it holds counts or photons, "
                        f"else {DEFAULT_NPHOTONS:g})")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="train as many epochs as fit in this many minutes, pre-training included (default: no "
                        "budget, --epochs epochs)")
    p.add_argument("--pretrain", type=float, default=None, metavar="FRACTION",
                   help="share of --time-budget spent on supervised pre-training with synthetic objects seen "
                        f"through this scan's probe, geometry and photon count (default {DEFAULT_PRETRAIN:g} with "
                        "--time-budget, else none)")
    p.add_argument("--output-mode", choices=OUTPUT_MODES, default="real_imag",
                   help="what the network outputs: amplitude/phase, or real/imaginary parts (with "
                        "--backprojection: a correction added to the back-projection; default %(default)s)")
    p.add_argument("--backprojection", action=argparse.BooleanOptionalAction, default=True,
                   help="give the network each pattern's probe-phase back-projection as extra input channels "
                        "(model.BackProjection; default: on)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                   help="cosine: warm-up then decay over the epochs or the time budget; plateau: halve on a "
                        "stalled validation loss; constant (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of training groups held for validation (default %(default)g)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's; 1 is often faster on a busy machine)")
    p.add_argument("--seed", type=int, default=0, help="random seed of data split, init and batches "
                                                       "(default %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train: auto picks CUDA when torch sees a GPU (default %(default)s)")
    p.add_argument("--train-fraction", type=float, default=0.75,
                   help="fraction of the scan used for training when there is no --test-data (1: all of it; "
                        "default %(default)g)")
    p.add_argument("--no-graphs", action="store_true", help="do not compile TorchScript/ONNX graphs")
    adv = p.add_argument_group("simulation (advanced)")
    adv.add_argument("--n-positions", type=_positive_int, default=None,
                     help="random scan with this many positions (default: a raster of 289)")
    adv.add_argument("--object-size", type=_positive_int, default=None, help="object side in pixels (default 5N)")
    adv.add_argument("--step", type=_positive_int, default=None, help="raster scan step in pixels (default N/4)")
    p.set_defaults(func=cmd_train)
    _add_evaluate_parser(sub, common)
    return parser


def _looks_like_bundle(token: str) -> bool:
    return (os.path.exists(token) or token.lower().endswith((".h5", ".hdf5")) or os.sep in token
            or (os.altsep is not None and os.altsep in token))


def _with_default_command(argv: list[str]) -> list[str]:
    """``ptycho-export [--debug] BUNDLE [opts]`` → ``ptycho-export [--debug] bundle BUNDLE [opts]``."""
    i = 0
    while i < len(argv) and argv[i] == "--debug":
        i += 1
    if i >= len(argv):
        return argv
    token = argv[i]
    if token in COMMANDS or token in ("-h", "--help", "--version"):
        return argv
    rest = argv[i:]
    if token.startswith("-") and any(not t.startswith("-") and _looks_like_bundle(t) for t in rest):
        return argv[:i] + ["bundle"] + rest  # e.g. ptycho-export --force BUNDLE
    if not token.startswith("-") and _looks_like_bundle(token):
        return argv[:i] + ["bundle"] + rest
    return argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; return the exit code (see ``--help``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(_with_default_command(argv))
        except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
            return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
        if getattr(args, "command", None) is None:
            parser.print_usage(sys.stderr)
            _error_line("give a bundle path or a command (run with --help for the list)")
            return EXIT_USAGE
        args.command_line = "ptycho-export " + shlex.join(argv)  # recorded in what the command writes
        return int(args.func(args))
    except KeyboardInterrupt:
        _error_line("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line per failure, traceback only with --debug
        if debug:
            traceback.print_exc()
        code, message = _classify(exc)
        _error_line(message)
        return code


def _classify(exc: BaseException) -> tuple[int, str]:
    from ptycho_runtime.bundle_format import BundleChecksumError, BundleError, BundleIntegrityError

    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, BundleChecksumError):
        return EXIT_CHECKSUM, f"checksum failure: {exc}"
    if isinstance(exc, BundleIntegrityError):  # damaged or modified, caught by a self-test rather than a checksum
        return EXIT_CHECKSUM, f"integrity failure: {exc}"
    if isinstance(exc, (BundleError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return EXIT_USAGE, str(exc)  # every reader failure is a BundleError: bad input, not a bug
    try:
        from .export import ParityError
    except Exception:  # noqa: BLE001 - torch missing or broken: no ParityError can have been raised
        ParityError = ()  # type: ignore[assignment]
    if ParityError and isinstance(exc, ParityError):
        return EXIT_PARITY, f"parity mismatch: {exc}"
    return EXIT_ERROR, f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
