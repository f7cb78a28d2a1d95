"""``ptycho-export train``: train a model, write the bundle (with graphs), the test-region figure and report.md.

``train(TrainOptions)`` is the work and returns a ``TrainResult`` (paths,
history, graph outcome, the test region's score); ``cmd_train`` prints it and
chooses the exit code. The option defaults live on ``TrainOptions`` and the
parser reads them from there, so a test calling ``train`` gets what the
command line gets.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ptycho_runtime.reconstruction.geometry import DEFAULT_CENTRE

from .errors import EXIT_OK, EXIT_PARITY, CliError, error_line
from .output import GRAPH_HEADERS, err_cell, graph_rows, mib, table
from .train_data import DEFAULT_NPHOTONS, load_training_data, split_for_training
from .train_report import RunFacts, TestScore, figure_title, quality_line, report_markdown, score_test_region

DEFAULT_PRETRAIN = 0.9
INSTRUMENT_OPTIONS = (("photon_energy_eV", "photon_energy_ev"), ("detector_distance_m", "detector_distance_m"),
                      ("detector_pixel_size_m", "detector_pixel_size_m"),
                      ("object_pixel_size_m", "object_pixel_size_m"))


@dataclass
class TrainOptions:
    """Every ``ptycho-export train`` option, named as on the command line; exactly one of data/simulate/product."""

    output_dir: Path
    data: Optional[Path] = None
    simulate: Optional[str] = None
    product: Optional[Path] = None
    patterns: Optional[Path] = None
    test_data: Optional[Path] = None
    units: str = "auto"
    counts: bool = False
    position_centre: str = DEFAULT_CENTRE
    photon_energy_ev: Optional[float] = None
    detector_distance_m: Optional[float] = None
    detector_pixel_size_m: Optional[float] = None
    object_pixel_size_m: Optional[float] = None
    N: Optional[int] = None
    gridsize: int = 1
    n_filters_scale: int = 2
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    nphotons: Optional[float] = None
    time_budget: Optional[float] = None  # minutes
    pretrain: Optional[float] = None  # default DEFAULT_PRETRAIN with a time budget, else 0
    output_mode: str = "real_imag"
    backprojection: bool = True
    lr_schedule: str = "cosine"
    val_fraction: float = 0.05
    threads: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    train_fraction: float = 0.75
    no_graphs: bool = False
    n_positions: Optional[int] = None
    object_size: Optional[int] = None
    step: Optional[int] = None
    command_line: Optional[str] = None  # recorded in the bundle's training summary

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "TrainOptions":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


@dataclass
class TrainResult:
    """What a training run wrote and found."""

    bundle_path: Path
    report_path: Path
    files: list[Path]
    history: dict[str, list[float]]
    training_summary: dict[str, Any]
    n_train: int
    n_test: int
    export_summary: Optional[dict[str, Any]] = None  # add_graphs_to_bundle's summary, when graphs were compiled
    graph_error: Optional[str] = None  # trained and saved, but a graph failed parity (stored without graphs)
    test: Optional[TestScore] = None  # the held-out region's reconstruction and score; None without a test scan
    wall_time_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def scored(self):
        """The test region's ``evaluate.ScoredReconstruction``, or None."""
        return None if self.test is None else self.test.scored


# --------------------------------------------------------------------------- options → config


def _pretrain_fraction(options: TrainOptions) -> float:
    if options.pretrain is not None and options.time_budget is None:
        raise CliError("--pretrain is a share of the time budget: give --time-budget MINUTES as well")
    if options.pretrain is None:
        return DEFAULT_PRETRAIN if options.time_budget is not None else 0.0
    return options.pretrain


def training_config(options: TrainOptions, N: int, nphotons: float, fixed_scale: bool, pretrain: float):
    """The validated TrainingConfig of a run; a bad option is a ``CliError`` naming it."""
    from ..config import ModelConfig, TrainingConfig

    try:
        model_cfg = ModelConfig(N=N, gridsize=options.gridsize, n_filters_scale=options.n_filters_scale,
                                intensity_scale_trainable=not fixed_scale,
                                input_backprojection=options.backprojection, output_mode=options.output_mode)
        budget = None if options.time_budget is None else options.time_budget * 60.0
        return TrainingConfig(model=model_cfg, nepochs=options.epochs, batch_size=options.batch_size,
                              learning_rate=options.lr, nphotons=nphotons, seed=options.seed,
                              device=options.device, output_dir=Path(options.output_dir),
                              train_data_file=options.data, test_data_file=options.test_data, progress=True,
                              export_graphs=False, time_budget_s=budget, lr_schedule=options.lr_schedule,
                              pretrain_fraction=pretrain if budget is not None else 0.0,
                              val_fraction=options.val_fraction, command=options.command_line)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _instrument(options: TrainOptions, physics: Optional[dict]) -> Optional[dict]:
    """The data's instrument, with every --photon-energy-ev / --detector-* / --object-pixel-size-m given over it."""
    out = dict(physics or {})
    for key, option in INSTRUMENT_OPTIONS:
        value = getattr(options, option)
        if value is not None:
            if not (np.isfinite(value) and value > 0):
                raise CliError(f"--{option.replace('_', '-')} must be > 0 (got {value})")
            out[key] = float(value)
    return out or None


def _check_machine(options: TrainOptions) -> None:
    out_dir = Path(options.output_dir)
    if options.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CliError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"--output-dir {out_dir} exists and is not a folder")


# --------------------------------------------------------------------------- the run


def _compile_graphs(bundle_path: Path, no_graphs: bool) -> tuple[Optional[dict], Optional[str], str]:
    """(export summary, parity error, the report's note on graphs)."""
    if no_graphs:
        return None, None, "not compiled (--no-graphs)"
    from ..export import ParityError, add_graphs_to_bundle

    try:
        summary = add_graphs_to_bundle(bundle_path)
    except ParityError as exc:
        return None, str(exc), f"NOT stored: {exc}"
    note = ", ".join(f"{name} ({mib(g['size_bytes'])} MiB, max rel err {err_cell(g['max_rel_error'])})"
                     for name, g in summary["graphs"].items())
    return summary, None, note


def _write_outputs(out_dir: Path, test: Any, score: Optional[TestScore], history: dict) -> list[Path]:
    """test_scan.npz (for ``evaluate`` / ``ptycho-runtime infer``), reconstruction.png and history.json."""
    from ..data import save_npz

    files = []
    if test is not None:
        save_npz(out_dir / "test_scan.npz", test)
        files.append(out_dir / "test_scan.npz")
    if score is not None:
        from ptycho_runtime.files import write_png  # one plot for both CLIs (atomic write, colour bars)

        write_png(out_dir / "reconstruction.png", score.recon, figure_title(test.n, score.scored))
        files.append(out_dir / "reconstruction.png")
    (out_dir / "history.json").write_text(json.dumps({"epochs": len(history.get("loss", [])), **history},
                                                     indent=1) + "\n")
    files.append(out_dir / "history.json")
    return files


def _print_flush(line: str) -> None:
    print(line, flush=True)


def train(options: TrainOptions, echo: Callable[[str], None] = _print_flush) -> TrainResult:
    """Train, save the bundle, compile its graphs, score the held-out region and write report.md.

    ``echo`` receives the two progress lines (what is trained on, what was
    trained); the training loop logs its epochs on stderr. Raises
    ``CliError`` for a bad option or input file; a graph that fails parity is
    not raised but reported in ``TrainResult.graph_error`` (the bundle is
    kept, without graphs).
    """
    from .. import params
    from ..workflows.components import run_cdi_example_torch

    start = time.perf_counter()
    out_dir = Path(options.output_dir)
    pretrain = _pretrain_fraction(options)
    training_config(options, 64 if options.N is None else options.N, options.nphotons or DEFAULT_NPHOTONS, False,
                    pretrain)  # every option is checked before any data is read
    if not 0.0 < options.train_fraction <= 1.0:
        raise CliError(f"--train-fraction must be in (0, 1] (got {options.train_fraction})")
    if options.threads is not None:
        import torch

        torch.set_num_threads(options.threads)
    params.reset_cfg()  # a fresh start, whatever an earlier in-process command left in params.cfg
    data, test, data_desc = load_training_data(options)
    train_data, test, split = split_for_training(data, test, options.train_fraction)
    train_data.physics = _instrument(options, train_data.physics)
    # The data's own photon count, when its units tell it, is exact: the intensity scale is then fixed.
    nphotons = options.nphotons or train_data.nphotons or DEFAULT_NPHOTONS
    config = training_config(options, data.N, nphotons, options.nphotons is None and train_data.nphotons is not None,
                             pretrain)
    _check_machine(options)

    n_test = 0 if test is None else test.n
    echo(f"Training on {data_desc}: {train_data.n} train / {n_test} test patterns ({split})")
    _, _, results = run_cdi_example_torch(train_data, test, config, do_stitching=False)
    bundle_path = Path(results["bundle_path"])
    history = {k: [float(v) for v in vals] for k, vals in results["history"].items()}
    summary = results["training_summary"]
    echo(f"Trained {summary.get('epochs_run', len(history.get('loss', [])))} epoch(s) on {summary.get('device')} "
         f"in {summary.get('wall_time_s', float('nan')):.1f} s; bundle {bundle_path}")

    export_summary, graph_error, graph_note = _compile_graphs(bundle_path, options.no_graphs)
    score = None
    if test is not None and results.get("test_container") is not None:
        score = score_test_region(results["models"]["diffraction_to_obj"], results["test_container"], test,
                                  results["intensity_scale"])
    files = [bundle_path] + _write_outputs(out_dir, test, score, history)
    facts = RunFacts(data_description=data_desc, split=split, n_train=train_data.n, n_test=n_test, N=data.N,
                     model=config.model, intensity_scale=results["intensity_scale"], nphotons=nphotons,
                     training=summary, history=history, wall_time_s=time.perf_counter() - start,
                     bundle_name=bundle_path.name, graph_note=graph_note)
    report_path = out_dir / "report.md"
    report_path.write_text(report_markdown(options, facts, score))
    files.append(report_path)
    return TrainResult(bundle_path=bundle_path, report_path=report_path, files=files, history=history,
                       training_summary=summary, n_train=train_data.n, n_test=n_test, export_summary=export_summary,
                       graph_error=graph_error, test=score, wall_time_s=facts.wall_time_s)


def print_train_result(result: TrainResult) -> None:
    if result.export_summary is not None:
        print(table(GRAPH_HEADERS, graph_rows(result.export_summary)))
    if result.scored is not None:
        print(quality_line(result.scored))
    print("Wrote " + ", ".join(str(p) for p in result.files))


def cmd_train(args: argparse.Namespace) -> int:
    result = train(TrainOptions.from_namespace(args))
    if result.graph_error is not None:
        error_line(result.graph_error)
    print_train_result(result)
    return EXIT_PARITY if result.graph_error is not None else EXIT_OK
