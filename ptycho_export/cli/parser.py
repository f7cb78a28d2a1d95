"""The ``ptycho-export`` argument parser: one function per subcommand, the exit-code tables, the bare BUNDLE form.

Parsing only: every subcommand's work is a plain function in its own module
(``bundle_command``, ``inspect_command``, ``verify_command``,
``train_command``, ``evaluate_command``), which the parser names as
``func``. Building the parser imports no torch, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from .. import __version__
from .bundle_command import CompileOptions, cmd_bundle
from .errors import PROG
from .evaluate_command import EvaluateOptions, cmd_evaluate
from .inspect_command import cmd_inspect
from .train_command import DEFAULT_PRETRAIN, TrainOptions, cmd_train
from .train_data import DEFAULT_NPHOTONS
from .verify_command import cmd_verify

COMMANDS = ("bundle", "inspect", "verify", "train", "evaluate")

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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (got {text})")
    return value


# --------------------------------------------------------------------------- bundle, inspect, verify


def _add_bundle_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bundle", parents=[common], help="add (or refresh) compiled graphs in a bundle",
                       formatter_class=_HelpFormatter, epilog=BUNDLE_EXITS,
                       description="Compile the bundle's eager models to TorchScript and ONNX, check every graph "
                                   "against the eager model, and store graphs and parity vectors in the bundle "
                                   "(atomically). Graphs already present are kept unless --force.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file, or a folder holding wts.h5")
    p.add_argument("--opset", type=int, default=CompileOptions.opset, help="ONNX opset (default %(default)s)")
    p.add_argument("--force", action="store_true", help="re-export graphs that are already present")
    p.add_argument("--no-torchscript", action="store_true", help="do not compile TorchScript graphs")
    p.add_argument("--no-onnx", action="store_true", help="do not compile ONNX graphs")
    p.add_argument("--tolerance", type=tolerance, default=CompileOptions.tolerance,
                   help="relative parity tolerance vs eager (default %(default)g)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_bundle)


def _add_inspect_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("inspect", parents=[common], help="show what a bundle holds",
                       formatter_class=_HelpFormatter, epilog=INSPECT_EXITS,
                       description="Show format, producer, params, models, graphs and training history "
                                   "(checksums are verified while reading).")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file, or a folder holding wts.h5")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_inspect)


def _add_verify_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from ..verify import BACKENDS

    p = sub.add_parser("verify", parents=[common], help="re-check checksums and graph parity on this machine",
                       formatter_class=_HelpFormatter, epilog=VERIFY_EXITS,
                       description="Verify every checksum, then recompute the stored parity cases with every "
                                   f"backend available here ({', '.join(BACKENDS)}) and compare with the stored "
                                   "eager outputs.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file, or a folder holding wts.h5")
    p.add_argument("--backend", action="append", choices=BACKENDS,
                   help="check only this backend (repeatable; default: all available)")
    p.add_argument("--tolerance", type=tolerance, default=None,
                   help="relative tolerance for every comparison (default: each graph's export tolerance; "
                        "1e-5 for eager)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)


# --------------------------------------------------------------------------- train


def _add_train_sources(p: argparse.ArgumentParser) -> None:
    from ptycho_runtime.cli import add_scan_arguments

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


def _add_train_model(p: argparse.ArgumentParser) -> None:
    from ..config import OUTPUT_MODES

    d = TrainOptions
    p.add_argument("--N", type=int, default=None, help="patch size (default: the data's, or 64 when simulating)")
    p.add_argument("--gridsize", type=int, default=d.gridsize,
                   help="patterns per group, gridsize² (1, 2 or 3; default %(default)s)")
    p.add_argument("--n-filters-scale", type=positive_int, default=d.n_filters_scale,
                   help="width multiplier of the U-Net's filters (default %(default)s)")
    p.add_argument("--output-mode", choices=OUTPUT_MODES, default=d.output_mode,
                   help="what the network outputs: amplitude/phase, or real/imaginary parts (with "
                        "--backprojection: a correction added to the back-projection; default %(default)s)")
    p.add_argument("--backprojection", action=argparse.BooleanOptionalAction, default=d.backprojection,
                   help="give the network each pattern's probe-phase back-projection as extra input channels "
                        "(model.BackProjection; default: on)")
    p.add_argument("--no-graphs", action="store_true", help="do not compile TorchScript/ONNX graphs")


def _add_train_schedule(p: argparse.ArgumentParser) -> None:
    from ..config import LR_SCHEDULES

    d = TrainOptions
    p.add_argument("--epochs", type=positive_int, default=d.epochs,
                   help="training epochs; with --time-budget, the most allowed (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="groups per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate (default %(default)g)")
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
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="cosine: warm-up then decay over the epochs or the time budget; plateau: halve on a "
                        "stalled validation loss; constant (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of training groups held for validation (default %(default)g)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's; 1 is often faster on a busy machine)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed of data split, init and batches "
                                                            "(default %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                   help="where to train: auto picks CUDA when torch sees a GPU (default %(default)s)")
    p.add_argument("--train-fraction", type=float, default=d.train_fraction,
                   help="fraction of the scan used for training when there is no --test-data (1: all of it; "
                        "default %(default)g)")


def _add_train_simulation(p: argparse.ArgumentParser) -> None:
    adv = p.add_argument_group("simulation (advanced)")
    adv.add_argument("--n-positions", type=positive_int, default=None,
                     help="random scan with this many positions (default: a raster of 289)")
    adv.add_argument("--object-size", type=positive_int, default=None, help="object side in pixels (default 5N)")
    adv.add_argument("--step", type=positive_int, default=None, help="raster scan step in pixels (default N/4)")


def _add_train_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common], help="train a model and write bundle, reconstruction and report",
                       formatter_class=_HelpFormatter, epilog=TRAIN_EXITS,
                       description="Train PtychoPINN on an NPZ scan or a simulated one (split spatially into "
                                   "train/test), write OUTPUT_DIR/wts.h5 (with graphs unless --no-graphs), "
                                   "reconstruction.png, history.json and report.md (the test region scored as "
                                   "evaluate scores it).")
    _add_train_sources(p)
    _add_train_model(p)
    _add_train_schedule(p)
    _add_train_simulation(p)
    p.set_defaults(func=cmd_train)


# --------------------------------------------------------------------------- evaluate


def _algorithms(allowed: tuple[str, ...]) -> Any:
    """argparse type: a comma list of pty-chi algorithms, each in ``allowed``, as a tuple in the order given."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
        bad = [n for n in names if n not in allowed]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)} (a comma list runs each)")
        return names

    return parse


def _add_evaluate_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from ptycho_runtime.inference.scan_refinement import (
        COARSE_SWEEPS_HELP,
        MAX_SWEEPS_HELP,
        PHASE_FIELD_HELP,
        PHASE_RAMP_HELP,
        PROBE_RULE_NAMES,
        START_CHOICES,
    )
    from ptycho_runtime.reconstruction.alignment import ALIGN_MODES
    from ptycho_runtime.reconstruction.grouping import GROUPINGS
    from ptycho_runtime.refinement import DEFAULT_SWEEPS
    from ptycho_runtime.refinement.engine import BACKENDS, ENGINES
    from ptycho_runtime.refinement.object_prior import PRIORS

    from ..reference import ALGORITHMS, DEFAULT_BATCH_SIZE, DEFAULT_ITERATIONS

    p = sub.add_parser("evaluate", parents=[common], help="score a bundle's reconstruction against the true object",
                       formatter_class=_HelpFormatter, epilog=EVALUATE_EXITS,
                       description="Reconstruct SCAN.npz with the bundle (|probe|^2-weighted stitching), register it "
                                   "to the scan's objectGuess (sub-pixel, global phase removed) and report phase and "
                                   "amplitude RMSE, PSNR, SSIM and FRC resolution (1/7 threshold). With --reference, "
                                   "also reconstruct with pty-chi's ePIE or LSQML (known probe) and compare quality "
                                   "and wall time.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file, or a folder holding wts.h5")
    p.add_argument("scan", metavar="SCAN.npz", help="PtychoPINN NPZ that holds objectGuess (the true object)")
    p.add_argument("--reference", nargs="?", const="epie", default=None, type=_algorithms(ALGORITHMS),
                   metavar="{" + ",".join(ALGORITHMS) + "}",
                   help="also reconstruct with pty-chi from a flat object, in the same run on the same cores: "
                        "one algorithm or a comma list (epie,lsqml); ePIE if none is named; default: no reference; "
                        "needs pip install 'ptycho-export[reference]'")
    p.add_argument("--reference-iterations", type=positive_int, default=None, metavar="N",
                   help="pty-chi epochs for every reference (default: "
                        + ", ".join(f"{a} {n}" for a, n in DEFAULT_ITERATIONS.items()) + ")")
    p.add_argument("--reference-batch-size", type=positive_int, default=None, metavar="N",
                   help="positions per pty-chi update (default: " + ", ".join(
                       f"{a} {n}" for a, n in DEFAULT_BATCH_SIZE.items()) + ")")
    p.add_argument("--refine", nargs="?", type=positive_int, const=DEFAULT_SWEEPS,
                   default=EvaluateOptions.refine, metavar="N",
                   help="also score the network's object after N sweeps of the runtime's refinement with the scan's "
                        "probe (ptycho_runtime.refinement.refine), and the same N sweeps from a flat object "
                        f"(what the network's start is worth; default: 0, off; N defaults to {DEFAULT_SWEEPS})")
    p.add_argument("--align", default=EvaluateOptions.align, choices=ALIGN_MODES,
                   help="phase-align the network's patches over their overlaps before stitching, by one "
                        "least-squares solve (reconstruction.overlap_solve; 'ramps': offset and damped ramp per "
                        "pattern, 'group-…': one per network call; default: %(default)s)")
    p.add_argument("--refine-engine", choices=ENGINES, default=EvaluateOptions.refine_engine,
                   help="builtin (batched rPIE, torch-free) or ptychi (pty-chi LSQML; N is its epochs) "
                        "(default: %(default)s)")
    p.add_argument("--refine-backend", choices=BACKENDS, default=EvaluateOptions.refine_backend,
                   help="the builtin engine's backend (default: %(default)s: numba on the CPU where it is "
                        "installed, the runtime's [fast] extra, else numpy)")
    p.add_argument("--refine-probe", nargs="?", choices=tuple(PROBE_RULE_NAMES), const="on",
                   default=EvaluateOptions.refine_probe,
                   help="refine the probe with the object: on (the bare flag), off, or auto: keep the probe guess "
                        "unless the fit then stays far above the frames' Poisson noise (default: %(default)s)")
    p.add_argument("--refine-start", choices=START_CHOICES, default=EvaluateOptions.refine_start,
                   help="the refined row's start: auto (the network's phase alone or a flat object, "
                        "whichever fits best after two sweeps), or one of them; the control row always starts "
                        "flat (default: %(default)s)")
    p.add_argument("--amplitude-prior", choices=PRIORS, default=EvaluateOptions.amplitude_prior,
                   help="the refined rows' last step: tv (the refined amplitude denoised at its own noise level) "
                        "or none (the data-only object) (default: %(default)s)")
    p.add_argument("--phase-ramp-every", type=int, default=EvaluateOptions.phase_ramp_every, metavar="N",
                   help=PHASE_RAMP_HELP)
    p.add_argument("--phase-field-every", type=int, default=EvaluateOptions.phase_field_every, metavar="N",
                   help=PHASE_FIELD_HELP)
    p.add_argument("--refine-max-sweeps", type=int, default=EvaluateOptions.refine_max_sweeps, metavar="N",
                   help=MAX_SWEEPS_HELP)
    p.add_argument("--coarse-sweeps", type=int, default=EvaluateOptions.coarse_sweeps, metavar="N",
                   help=COARSE_SWEEPS_HELP)
    p.add_argument("--start-groups", choices=GROUPINGS, default=EvaluateOptions.start_groups,
                   help="gridsize > 1: the refined row's network predicts a cover of the frames (each in at least "
                        "one group, about a third of them) or all groups, as the network row does "
                        "(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="REPORT.json",
                   help="write the JSON report (default: none)")
    p.add_argument("--figure", type=Path, default=None, metavar="FIGURE.png",
                   help="write truth / network / reference / error images (default: none)")
    p.add_argument("--min-weight", type=float, default=EvaluateOptions.min_weight, metavar="FRACTION",
                   help="score pixels lit by at least this fraction of one exposure's peak |probe|^2 (default 0.2)")
    p.add_argument("--no-register", action="store_true", help="skip the sub-pixel registration to the truth")
    p.add_argument("--keep-amplitude-scale", action="store_true",
                   help="score the amplitude as reconstructed (default: one global amplitude factor is removed, "
                        "like the global phase, since a file's probe scale is arbitrary; the factor is reported)")
    p.add_argument("--counts", action="store_true", help="the NPZ diffraction holds counts, not amplitudes "
                                                         "(default: told from the values)")
    p.add_argument("--backend", choices=("auto", "onnx", "torchscript"), default=EvaluateOptions.backend,
                   help="runtime backend for the network (default auto: ONNX Runtime)")
    p.set_defaults(func=cmd_evaluate)


# --------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The whole ``ptycho-export`` parser; every subcommand gets ``--debug`` and an exit-code epilog."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Compile, inspect, verify and train PtychoPINN models stored as pickle-free HDF5 bundles.",
        usage=f"{PROG} [-h] [--version] [--debug] {{BUNDLE,bundle,inspect,verify,train,evaluate}} ...")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for add in (_add_bundle_parser, _add_inspect_parser, _add_verify_parser, _add_train_parser,
                _add_evaluate_parser):
        add(sub, common)
    return parser


def _looks_like_bundle(token: str) -> bool:
    return (os.path.exists(token) or token.lower().endswith((".h5", ".hdf5")) or os.sep in token
            or (os.altsep is not None and os.altsep in token))


def with_default_command(argv: list[str]) -> list[str]:
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
