"""What ``ptycho-export train`` reports about its run: the test region scored as ``evaluate`` scores it, and report.md.

One scoring in the project: the held-out region is scored with
``ptycho_export.evaluate.score_reconstruction`` (scanned-area mask,
sub-pixel registration, global phase removed, SSIM/PSNR/RMSE/FRC), with the
held-out scan's own positions and probe, so ``ptycho-export evaluate wts.h5
test_scan.npz`` prints the numbers report.md shows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

from .output import METRIC_ROWS, metric_cell


@dataclass
class TestScore:
    """The held-out region's reconstruction and its score (``scored`` None when it could not be scored)."""

    recon: Any
    scored: Any  # evaluate.ScoredReconstruction, or None
    note: Optional[str] = None  # why there is no score


def score_test_region(d2o: Any, container: Any, test: Any, intensity_scale: float) -> TestScore:
    """Reconstruct the held-out scan with the trained network and score it as ``evaluate`` does.

    The patches are stitched with the held-out scan's |probe|² window (as
    ``evaluate`` stitches with the scan's probe), then scored against
    ``test.object`` with the scan's positions and probe.
    """
    from ..evaluate import score_reconstruction
    from ..workflows.components import reconstruct_container

    t0 = time.perf_counter()
    recon, _ = reconstruct_container(d2o, container, intensity_scale, probe=test.probe)
    wall = time.perf_counter() - t0
    if test.object is None:
        return TestScore(recon, None, "No ground truth (the held-out scan has no objectGuess): no quality metrics.")
    positions = np.stack([test.xcoords, test.ycoords], axis=1)
    try:
        scored = score_reconstruction("network", recon, test.object, positions, test.probe, wall,
                                      details={"time_covers": "eager inference + |probe|^2-weighted stitching"})
    except ValueError as exc:
        return TestScore(recon, None, f"The held-out region could not be scored: {exc}")
    return TestScore(recon, scored)


def figure_title(n_patterns: int, scored: Any) -> str:
    title = f"test-region reconstruction ({n_patterns} patterns)"
    if scored is not None:
        m = scored.metrics
        title += (f" — phase SSIM {m['phase_ssim']:.3f}, PSNR amplitude {m['amplitude_psnr_db']:.1f} dB, "
                  f"phase {m['phase_psnr_db']:.1f} dB")
    return title


def quality_line(scored: Any) -> str:
    """The console summary of the score (the same numbers as report.md and ``evaluate``)."""
    m = scored.metrics
    return (f"Quality vs ground truth (scored as ptycho-export evaluate scores): phase SSIM {m['phase_ssim']:.3f}, "
            f"PSNR {m['phase_psnr_db']:.2f} dB; amplitude SSIM {m['amplitude_ssim']:.3f}, "
            f"PSNR {m['amplitude_psnr_db']:.2f} dB; {m['n_pixels']} pixels")


def quality_section(scored: Any) -> list[str]:
    """report.md's quality table: evaluate's metrics, rows as ``evaluate`` prints them."""
    from ..evaluate import DEFAULT_MIN_WEIGHT_FRACTION

    summary = scored.summary()
    m, shift = summary["metrics"], summary["alignment"]["found_shift_px"]
    lines = ["", "## Quality vs ground truth (test region)", "",
             "Scored as `ptycho-export evaluate wts.h5 test_scan.npz` scores "
             "(`ptycho_export.evaluate.score_reconstruction`): pixels lit by at least "
             f"{DEFAULT_MIN_WEIGHT_FRACTION:g} of one exposure's peak |probe|², registered to the truth "
             "(sub-pixel), global phase offset removed.", "",
             "| metric | network |", "|---|---|"]
    for label, key, fmt in METRIC_ROWS:
        nyquist = " (Nyquist)" if key == "frc_resolution_px" and m.get("frc_reaches_nyquist") else ""
        lines.append(f"| {label} | {metric_cell(m[key], fmt)}{nyquist} |")
    lines.append(f"| scored pixels | {m['n_pixels']} |")
    lines.append(f"| shift found (rows, cols px) | {shift['rows']:+.2f}, {shift['cols']:+.2f}"
                 + ("" if summary["alignment"]["shift_applied"] or (shift["rows"], shift["cols"]) == (0.0, 0.0)
                    else " (not applied)") + " |")
    lines += ["", f"Removed global phase offset: {summary['alignment']['phase_offset_rad']:.4f} rad."]
    return lines


@dataclass(frozen=True)
class RunFacts:
    """What report.md says about the run besides the score."""

    data_description: str
    split: str
    n_train: int
    n_test: int
    N: int
    model: Any  # config.ModelConfig
    intensity_scale: float
    nphotons: float
    training: Mapping[str, Any]  # the training summary
    history: Mapping[str, list]
    wall_time_s: float
    bundle_name: str
    graph_note: str


def _training_line(options: Any, facts: RunFacts) -> str:
    s = facts.training
    return (f"- **Training**: {len(facts.history.get('loss', []))} epoch(s) of {options.epochs} allowed"
            + (f" in a {options.time_budget:g}-minute budget (stopped by: {s.get('stop_reason')})"
               if options.time_budget else "")
            + (f", after {s['pretraining']['steps']} supervised pre-training steps "
               f"({s['pretraining']['wall_time_s']:.0f} s)" if "pretraining" in s else "")
            + f", batch {options.batch_size}, lr {options.lr:g} ({options.lr_schedule}), "
            f"nphotons {facts.nphotons:g}, seed {options.seed}, device {s.get('device')}, "
            f"{s.get('n_train')} train / {s.get('n_val')} validation groups")


def report_markdown(options: Any, facts: RunFacts, test: Optional[TestScore]) -> str:
    """report.md: data, model, training, wall time, losses, bundle, then the test region's score and figure."""
    model, loss, val = facts.model, facts.history.get("loss", []), facts.history.get("val_loss", [])
    lines = [
        "# ptycho-export training report", "",
        f"- **Data**: {facts.data_description}; {facts.split}: {facts.n_train} train / {facts.n_test} test patterns",
        f"- **Model**: N={facts.N}, gridsize={options.gridsize}, n_filters_scale={options.n_filters_scale}, "
        f"output_mode {model.output_mode}, amp_activation {model.amp_activation}, "
        f"input back-projection {'on' if model.input_backprojection else 'off'}; "
        f"intensity_scale {facts.intensity_scale:.6g}",
        _training_line(options, facts),
        f"- **Wall time**: {facts.wall_time_s:.1f} s in all, training "
        f"{facts.training.get('wall_time_s', float('nan')):.1f} s",
    ]
    if loss:
        lines.append(f"- **Final losses**: loss {loss[-1]:.6g}" + (f", val_loss {val[-1]:.6g}" if val else "")
                     + f" (best loss {min(loss):.6g})")
    lines.append(f"- **Bundle**: `{facts.bundle_name}`; graphs: {facts.graph_note}")
    if test is None:
        lines += ["", "No held-out scan (--train-fraction 1 without --test-data): no quality metrics."]
    elif test.scored is not None:
        lines += quality_section(test.scored)
    else:
        lines += ["", test.note or "No quality metrics."]
    if test is not None:
        lines += ["", "![reconstruction](reconstruction.png)"]
    return "\n".join(lines) + "\n"
