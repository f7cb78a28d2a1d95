"""``ptycho-export evaluate BUNDLE SCAN``: score the bundle's reconstruction against the scan's true object.

The scoring is ``ptycho_export.evaluate`` (the project's one scoring: the
training report uses it too); this module checks the options, runs it
(``run_evaluate``), and prints the comparison table.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from ptycho_runtime.inference.scan_refinement import RefineSettings

from .errors import EXIT_OK, CliError
from .output import METRIC_ROWS, metric_cell, plain, print_json, table, write_text_atomic


@dataclass(frozen=True)
class EvaluateOptions:
    """What ``ptycho-export evaluate`` takes (the parser's defaults are these)."""

    bundle: str
    scan: str
    reference: Optional[str | tuple[str, ...]] = None
    reference_iterations: Optional[int] = None
    reference_batch_size: Optional[int] = None
    refine: int = 0
    refine_engine: str = "builtin"
    refine_backend: str = "auto"
    refine_probe: str = "auto"
    amplitude_prior: str = "tv"
    phase_ramp_every: int = RefineSettings.phase_ramp_every
    phase_field_every: int = RefineSettings.phase_field_every
    refine_max_sweeps: int = RefineSettings.max_sweeps
    coarse_sweeps: int = RefineSettings.coarse_sweeps
    align: str = "none"
    refine_start: str = "auto"
    start_groups: str = "cover"
    output: Optional[Path] = None
    figure: Optional[Path] = None
    min_weight: float = 0.2
    no_register: bool = False
    keep_amplitude_scale: bool = False
    counts: bool = False
    backend: str = "auto"


def _check(options: EvaluateOptions) -> None:
    from ptycho_runtime.format import check_bundle_file

    check_bundle_file(options.bundle)  # before torch is imported
    if not Path(options.scan).is_file():
        raise CliError(f"scan {options.scan} not found (give a PtychoPINN NPZ with diffraction, xcoords, ycoords, "
                       "probeGuess and objectGuess)")
    if not 0.0 <= options.min_weight < 1.0:
        raise CliError(f"--min-weight must be in [0, 1) (got {options.min_weight})")
    if options.figure is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--figure needs matplotlib: pip install matplotlib") from None


def run_evaluate(options: EvaluateOptions) -> dict[str, Any]:
    """Evaluate, write the figure and JSON report where asked; return the report (plain data).

    Raises ``CliError`` for every input the user can fix (no ground truth,
    pty-chi missing, a scan that does not fit the bundle).
    """
    _check(options)
    from ptycho_runtime.inference.scan_refinement import probe_rule

    from ..evaluate import NoGroundTruthError, evaluate, write_figure
    from ..reference import DEFAULT_ITERATIONS, ReferenceUnavailableError

    references = (options.reference,) if isinstance(options.reference, str) else tuple(options.reference or ())
    if references:
        runs = ", ".join(f"{a} ({options.reference_iterations or DEFAULT_ITERATIONS[a]} iterations)"
                         for a in references)
        print(f"Reconstructing with the network, then with pty-chi {runs} from a flat object, known probe ...",
              file=sys.stderr, flush=True)
    try:
        ev = evaluate(options.bundle, options.scan, counts=options.counts, reference=references or None,
                      reference_iterations=options.reference_iterations,
                      reference_batch_size=options.reference_batch_size, min_weight_fraction=options.min_weight,
                      backend=options.backend, register=not options.no_register, refine=options.refine,
                      progress=lambda line: print(line, file=sys.stderr, flush=True),
                      remove_amplitude_scale=not options.keep_amplitude_scale,
                      refine_options={"engine": options.refine_engine, "backend": options.refine_backend,
                                      "refine_probe": probe_rule(options.refine_probe), "start": options.refine_start,
                                      "amplitude_prior": options.amplitude_prior,
                                      "phase_ramp_every": options.phase_ramp_every,
                                      "phase_field_every": options.phase_field_every,
                                      "max_sweeps": options.refine_max_sweeps,
                                      "coarse_sweeps": options.coarse_sweeps,
                                      "start_groups": options.start_groups},
                      align=options.align)
    except NoGroundTruthError as exc:
        raise CliError(str(exc)) from None
    except ReferenceUnavailableError as exc:
        raise CliError(f"--reference: {exc}") from None
    except ValueError as exc:
        raise CliError(f"cannot evaluate {options.bundle} on {options.scan}: {exc}") from None
    report = ev.report
    if options.figure is not None:
        name = Path(report["bundle"]).name
        engines = " and ".join(r["engine"] for r in report.get("references", []))
        write_figure(options.figure, ev, title=f"{Path(options.scan).name} reconstructed by {name}"
                                               + (f" and {engines}" if engines else ""))
        report["figure"] = str(options.figure)
    if options.output is not None:
        write_text_atomic(Path(options.output), json.dumps(plain(report), indent=2, allow_nan=False) + "\n")
    return report


def _refinement_name(summary: Mapping[str, Any]) -> str:
    """"16 sweeps (4 coarse), numpy, TV amplitude" / "20 sweeps, pty-chi LSQML": what ran, for a column heading."""
    engine = summary.get("engine", "builtin")
    what = f"pty-chi {summary.get('algorithm', '')}".strip() if engine == "ptychi" else summary.get("backend", "")
    coarse = summary.get("coarse_sweeps") or 0
    return (f"{summary['iterations']} sweeps" + (f" ({coarse} coarse)" if coarse else "") + f", {what}"
            + (", probe refined" if summary.get("probe_updated") else "")
            + (", TV amplitude" if (summary.get("amplitude_prior") or {}).get("applied") else "")
            + (", slow phase fitted" if any(f.get("applied") for f in summary.get("phase_field_fits") or ()) else "")
            + (", ramp fitted" if any(f.get("applied") for f in summary.get("phase_ramp_fits") or ()) else ""))


def _start_line(refined: Mapping[str, Any]) -> str:
    """Which start the refined row finished, and why, as the head of the gain line."""
    start, misfit = refined.get("start"), refined.get("start_misfit") or {}
    if refined.get("start_rule") != "auto" or start is None:
        return f"The refined row's start ({start})"
    if start != "flat":
        return f"The network's start ({start!r}, the best fit after the trial sweeps)"
    network = min((v for k, v in misfit.items() if k != "flat"), default=None)
    ratio = f"{network / misfit['flat']:.1f}x " if network and misfit.get("flat") else ""
    return (f"The refined row finished a flat start (start='auto': it fit the frames {ratio}better than the "
            "network's after the trial sweeps, so the network's start was not used; a probe the bundle was not "
            "trained for?)")


def _ramp_cell(alignment: Mapping[str, Any]) -> str:
    """The removed phase ramp (rows, cols) in mrad/px, or "-" where none was (a known probe fixes it)."""
    ramp = alignment.get("phase_ramp_rad_per_px") or {"rows": 0.0, "cols": 0.0}
    if ramp["rows"] == 0.0 and ramp["cols"] == 0.0:
        return "-"
    return f"{1e3 * ramp['rows']:+.2f}, {1e3 * ramp['cols']:+.2f}"


def evaluate_table(report: Mapping[str, Any]) -> str:
    """One column per scored method (network, refined, control, reference), one row per metric."""
    methods = [("network", report["network"])]
    if "refined" in report:
        methods.append((f"network + {_refinement_name(report['refined'])}", report["refined"]))
        methods.append((f"flat + {_refinement_name(report['refine_control'])}", report["refine_control"]))
    for ref in report.get("references", []):
        methods.append((f"{ref['engine']} ({ref['iterations']} it)", ref))
    rows = []
    for label, key, fmt in METRIC_ROWS:
        cells = [metric_cell(m["metrics"][key], fmt) for _, m in methods]
        if key == "frc_resolution_px":
            cells = [c + (" (Nyquist)" if m["metrics"]["frc_reaches_nyquist"] else "") for c, (_, m) in
                     zip(cells, methods, strict=True)]
        rows.append([label] + cells)
    rows.append(["scored pixels"] + [str(m["metrics"]["n_pixels"]) for _, m in methods])
    rows.append(["shift found (rows, cols px)"] + [
        f"{m['alignment']['found_shift_px']['rows']:+.2f}, {m['alignment']['found_shift_px']['cols']:+.2f}"
        + ("" if m["alignment"]["shift_applied"] or m["alignment"]["found_shift_px"] == {"rows": 0.0, "cols": 0.0}
           else " (not applied)") for _, m in methods])
    rows.append(["amplitude scale removed"] + [f"x{m['alignment']['amplitude_scale']:.3f}" for _, m in methods])
    rows.append(["phase ramp removed (mrad/px)"] + [_ramp_cell(m["alignment"]) for _, m in methods])
    rows.append(["wall time (s)"] + [f"{m['wall_time_s']:.2f}" for _, m in methods])
    return table(["metric"] + [label for label, _ in methods], rows)


def print_evaluation(report: Mapping[str, Any], options: EvaluateOptions) -> None:
    print(f"Evaluated {report['bundle']} on {report['scan']}: {report['n_patterns']} patterns, N={report['N']}, "
          f"gridsize {report['gridsize']}; |probe|^2-weighted stitching; scored where the illumination is "
          f">= {report['min_weight_fraction']:g} of one exposure's peak; registered; global phase "
          + ("and amplitude scale removed" if report.get("amplitude_scale_removed") else "removed"))
    print(evaluate_table(report))
    if report.get("speedup") is not None:
        print(f"Speed: the network (inference + stitching) is {report['speedup']:.1f}x faster than "
              f"{report['reference']['engine']} ({report['reference']['iterations']} iterations)"
              + (f"; with its {report['refined']['iterations']} refinement sweeps, {report['refined_speedup']:.1f}x"
                 if "refined_speedup" in report else "") + ".")
    gain = report.get("network_start_gain")
    if gain is not None:
        sweeps = report["refined"]["iterations"]
        control = report["refine_control"]["iterations"]
        # a run extended past its sweeps (the probe refined, the fit far above the noise) ends on its own count
        after = f"both after {sweeps} sweeps" if control == sweeps else f"after {sweeps} and {control} sweeps"
        from ..evaluate import START_TIE_PHASE_SSIM

        verdict = report["network_start_verdict"]
        if verdict == "a tie":
            verdict = f"a tie on phase: |difference| < {START_TIE_PHASE_SSIM:g}, the spread between two runs"
        elif verdict != "flat start finished":
            verdict += " on phase"
        print(_start_line(report["refined"])
              + f" against a flat start, {after}: phase SSIM "
              f"{gain['phase_ssim']:+.3f}, amplitude SSIM {gain['amplitude_ssim']:+.3f}, phase PSNR "
              f"{gain['phase_psnr_db']:+.2f} dB ({verdict})")
    for ref in report.get("references", [])[1:]:
        print(f"  vs {ref['engine']} ({ref['iterations']} iterations, {ref['wall_time_s']:.1f} s): the network is "
              f"{ref['wall_time_s'] / report['network']['wall_time_s']:.1f}x faster"
              + (f", with its refinement {ref['wall_time_s'] / report['refined']['wall_time_s']:.1f}x"
                 if "refined" in report else ""))
    written = [p for p in (options.output, options.figure) if p is not None]
    if written:
        print("Wrote " + ", ".join(str(p) for p in written))


def cmd_evaluate(args: argparse.Namespace) -> int:
    options = EvaluateOptions(bundle=args.bundle, scan=args.scan, reference=args.reference,
                              reference_iterations=args.reference_iterations,
                              reference_batch_size=args.reference_batch_size, refine=args.refine,
                              refine_engine=args.refine_engine, refine_backend=args.refine_backend,
                              refine_probe=args.refine_probe, refine_start=args.refine_start, align=args.align,
                              amplitude_prior=args.amplitude_prior, phase_ramp_every=args.phase_ramp_every,
                              phase_field_every=args.phase_field_every, refine_max_sweeps=args.refine_max_sweeps,
                              coarse_sweeps=args.coarse_sweeps,
                              start_groups=args.start_groups, output=args.output, figure=args.figure,
                              min_weight=args.min_weight,
                              no_register=args.no_register, keep_amplitude_scale=args.keep_amplitude_scale,
                              counts=args.counts, backend=args.backend)
    report = run_evaluate(options)
    if args.json:
        print_json(report)
    else:
        print_evaluation(report, options)
    return EXIT_OK
