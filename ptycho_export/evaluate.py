"""Score a bundle's reconstruction of a scan against the scan's true object (``ptycho-export evaluate``).

One job: given a bundle and a PtychoPINN NPZ that holds ``objectGuess`` (the
ground truth of a simulation), say how good the network's reconstruction is,
in the numbers ptychography papers use, optionally next to an iterative
engine's reconstruction of the same scan (``reference.py``).

Steps, each chosen for a measured reason:

1. **Stitch** with the torch-free runtime (``ptycho_runtime.load_bundle(...)
   .reconstruct``), weighting every patch by the probe intensity |P|²: the
   default central crop gives full weight to the dim probe edge, and the
   |P|² window measurably scores better (docs/fidelity.md). The network's
   wall time is that call: inference plus stitching (loading is reported
   apart).
2. **Mask** to the scanned area: pixels whose illumination Σ|P|² is at least
   ``min_weight_fraction`` of one exposure's peak max|P|² (so sparse parts of a
   random scan still count), inside the truth. The illumination
   is computed from the positions and the probe on each reconstruction's own
   grid, so the network and the reference are scored on the same object
   region.
3. **Align**: sub-pixel registration to the truth (scikit-image
   ``phase_cross_correlation``, 1/100 px) applied to the reconstruction (only
   when within ±4 px: a larger "shift" means no correlation), then
   removal of the global phase offset, which ptychography cannot determine.
4. **Score** (``metrics.image_quality``): amplitude and phase RMSE, PSNR and
   SSIM (scikit-image, explicit data range), FRC resolution at the 1/7
   threshold on the complex images.

The report is plain data (JSON-ready); ``write_figure`` draws truth / network /
reference / error rows with a matplotlib ``Figure`` on an Agg canvas, written
atomically.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ptycho_runtime.reconstruction.compiled import available_kernels
from ptycho_runtime.reconstruction.grouping import count_groups
from ptycho_runtime.reconstruction.stitching import probe_window

from .metrics import (
    DEFAULT_MAX_SHIFT_PX,
    FRC_THRESHOLD,
    Alignment,
    align_to_truth,
    image_quality,
    sample_object,
    scanned_mask,
)

__all__ = ["DEFAULT_MIN_WEIGHT_FRACTION", "Evaluation", "NoGroundTruthError", "ScoredReconstruction", "evaluate",
           "illumination", "score_reconstruction", "write_figure"]

DEFAULT_MIN_WEIGHT_FRACTION = 0.2
"""Pixels lit by less than 20% of one exposure's peak intensity are scan edge, undetermined for any method."""
GAIN_METRICS = ("phase_ssim", "amplitude_ssim", "phase_psnr_db", "amplitude_psnr_db")
"""What ``network_start_gain`` compares between the network's start and the flat start."""
START_TIE_PHASE_SSIM = 0.002
"""A phase-SSIM gain of the network's start over the flat one smaller than this is a tie, not a win: two runs of the
same refinement differ by up to ±0.002 (threads' summation order; docs/fidelity.md, "The start, flat included")."""


def start_verdict(gain: Mapping[str, float], start: Optional[str]) -> str:
    """``network_start_gain`` in words: "flat start finished" (the network's start was not used), "better", "a tie"
    (|Δ phase SSIM| < ``START_TIE_PHASE_SSIM``) or "worse", on phase SSIM, the quantity the network's start is for."""
    if start == "flat":
        return "flat start finished"
    delta = float(gain["phase_ssim"])
    if abs(delta) < START_TIE_PHASE_SSIM:
        return "a tie"
    return "better" if delta > 0 else "worse"


class NoGroundTruthError(ValueError):
    """The scan has no ``objectGuess``: there is nothing to score against."""


@dataclass
class ScoredReconstruction:
    """One method's reconstruction, aligned to the truth, with its metrics and cost."""

    label: str
    alignment: Alignment
    metrics: dict[str, Any]
    wall_time_s: float
    x_coords: np.ndarray
    y_coords: np.ndarray
    details: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """JSON-ready: metrics, alignment and timing (the FRC curve included)."""
        return {
            "label": self.label,
            "wall_time_s": self.wall_time_s,
            "alignment": {"shift_px": {"rows": self.alignment.shift_px[0], "cols": self.alignment.shift_px[1]},
                          "found_shift_px": {"rows": self.alignment.found_shift_px[0],
                                             "cols": self.alignment.found_shift_px[1]},
                          "shift_applied": self.alignment.shift_px != (0.0, 0.0),
                          "phase_offset_rad": self.alignment.phase_offset_rad,
                          "amplitude_scale": self.alignment.amplitude_scale,
                          "phase_ramp_rad_per_px": {"rows": self.alignment.phase_ramp_rad_per_px[0],
                                                    "cols": self.alignment.phase_ramp_rad_per_px[1]}},
            "metrics": self.metrics,
            **self.details,
        }


@dataclass
class Evaluation:
    """What ``evaluate`` found: the report (plain data) and the scored images (for the figure)."""

    report: dict[str, Any]
    network: ScoredReconstruction
    reference: Optional[ScoredReconstruction] = None
    refined: Optional[ScoredReconstruction] = None
    control: Optional[ScoredReconstruction] = None
    references: list[ScoredReconstruction] = field(default_factory=list)


def illumination(positions: np.ndarray, probe: np.ndarray, x_coords: np.ndarray, y_coords: np.ndarray) -> np.ndarray:
    """Σ over positions of |probe|² placed at each position, on the grid ``x_coords`` × ``y_coords``.

    Same placement as the runtime's stitching (``ptycho_runtime.reconstruction.stitching.StitchCanvas``,
    frame centre (N−1)/2); the grid must be an integer-origin, unit-step canvas
    that holds every frame, as ``Bundle.reconstruct`` returns.
    """
    from ptycho_runtime.reconstruction.stitching import StitchCanvas

    p = np.asarray(probe)
    N = p.shape[-1]
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    origin = (int(round(float(x_coords[0]))), int(round(float(y_coords[0]))))
    canvas = StitchCanvas((len(y_coords), len(x_coords)), N, origin, window=np.abs(p) ** 2)
    canvas.add(np.ones((pos.shape[0], N, N), np.complex64), pos)
    return canvas.result().weight


def score_reconstruction(label: str, recon: Any, truth_object: np.ndarray, positions: np.ndarray,
                         probe: np.ndarray, wall_time_s: float,
                         min_weight_fraction: float = DEFAULT_MIN_WEIGHT_FRACTION,
                         register: bool = True, details: Optional[dict[str, Any]] = None,
                         remove_amplitude_scale: bool = True,
                         remove_phase_ramp: bool = False) -> ScoredReconstruction:
    """Mask, align and score one ``Reconstruction`` (object, weight, x_coords, y_coords) against the truth.

    The global phase and (unless ``remove_amplitude_scale`` is False) the
    global amplitude scale are removed first (``metrics.align_to_truth``);
    with ``remove_phase_ramp`` (for a reconstruction whose probe was
    refined too), a linear phase ramp as well.
    """
    truth, inside = sample_object(truth_object, recon.x_coords, recon.y_coords)
    light = illumination(positions, probe, recon.x_coords, recon.y_coords)
    peak = float(np.max(np.abs(np.asarray(probe)) ** 2))
    mask = scanned_mask(light, inside, min_weight_fraction, level=peak) & (np.asarray(recon.weight) > 0)
    if not mask.any():
        raise ValueError(f"{label}: no reconstructed pixel overlaps the truth object with at least "
                         f"{min_weight_fraction:g} of the peak illumination (check that the positions are in the "
                         "objectGuess's pixel frame, or lower --min-weight)")
    alignment = align_to_truth(recon.object, truth, mask, register_shift=register,
                               remove_amplitude_scale=remove_amplitude_scale, remove_phase_ramp=remove_phase_ramp)
    return ScoredReconstruction(label=label, alignment=alignment, metrics=image_quality(alignment),
                                wall_time_s=float(wall_time_s), x_coords=np.asarray(recon.x_coords),
                                y_coords=np.asarray(recon.y_coords), details=dict(details or {}))


def evaluate(bundle_path: str | os.PathLike, scan_path: str | os.PathLike, *, counts: bool = False,
             reference: Optional[str | Sequence[str]] = None,
             reference_iterations: Optional[int | Mapping[str, int]] = None,
             reference_batch_size: Optional[int] = None, min_weight_fraction: float = DEFAULT_MIN_WEIGHT_FRACTION,
             backend: str = "auto", device: str = "auto", batch_size: Optional[int] = None,
             register: bool = True, refine: int = 0,
             progress: Optional[Callable[[str], None]] = None, remove_amplitude_scale: bool = True,
             refine_options: Optional[Mapping[str, Any]] = None, align: str = "none") -> Evaluation:
    """Reconstruct ``scan_path`` with the bundle (and optionally pty-chi) and score both against the truth.

    ``refine`` > 0 also scores the network's object after that many sweeps of
    the runtime's refinement (``inference.scan_refinement.refine_scan``, as
    ``Bundle.reconstruct(refine=...)`` and ``ptycho-runtime infer`` run it,
    with the scan's probe and ``refine_options``: the ``RefineSettings``
    fields engine, backend, refine_probe, start),
    timed from the start of the network's reconstruction, and, as the control
    that shows what the network's start is worth, the same sweeps from a flat
    object (``refine_control``); ``report["network_start_gain"]`` is the
    difference (refined − control) in each SSIM and PSNR. ``align``
    (``reconstruction.alignment.ALIGN_MODES``) phase-aligns the network's
    patches by the least-squares overlap solve before stitching
    (``Bundle.reconstruct(align=...)``).

    ``reference`` names one pty-chi algorithm or several ("epie", "lsqml"),
    each run from a flat object in this same call on the same cores;
    ``reference_iterations`` is one epoch count for all or a mapping per
    algorithm. ``progress(message)`` receives a line every ~5% of each
    reference's epochs (they run minutes on a CPU). ``remove_amplitude_scale``
    (default) scores every method after removing one global amplitude factor
    (``metrics.align_to_truth``; the factor is in each summary's alignment).

    Raises ``NoGroundTruthError`` when the NPZ has no ``objectGuess``,
    ``reference.ReferenceUnavailableError`` when ``reference`` is asked for
    without pty-chi, ``FileNotFoundError``/``ValueError`` for bad inputs.
    """
    from ptycho_runtime import load_bundle

    from .data import load_npz

    data = load_npz(scan_path, counts=counts)
    if data.object is None:
        raise NoGroundTruthError(f"{scan_path} has no objectGuess (the true object), so there is nothing to score "
                                 "against; evaluate needs a simulated scan or one with a known object "
                                 "(to just reconstruct it, use: ptycho-runtime infer BUNDLE SCAN -o RECON.h5)")
    algorithms = [] if reference is None else [reference] if isinstance(reference, str) else list(reference)
    if algorithms:
        from .reference import import_ptychi

        import_ptychi()  # fail before the inference if pty-chi is missing
    positions = np.stack([data.xcoords, data.ycoords], axis=1)
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_path, backend=backend, device=device)
    available_kernels()  # numba's compiled loops (stitching, refinement), where installed: loading, not inference
    load_s = time.perf_counter() - t0
    if bundle.N != data.N:
        raise ValueError(f"the scan's frames are {data.N}×{data.N} but the bundle's model was trained with "
                         f"N={bundle.N}: evaluate it on a scan with {bundle.N}×{bundle.N} frames")
    t0 = time.perf_counter()
    recon = bundle.reconstruct(data.diffraction, positions, counts=False, batch_size=batch_size,
                               window=probe_window(data.probe), align=align)  # load_npz normalised the amplitudes
    net_s = time.perf_counter() - t0
    provider = bundle.providers[0] if bundle.providers else bundle.backend

    def score(label: str, result: Any, wall_s: float, details: dict[str, Any]) -> ScoredReconstruction:
        # a probe refined with the object leaves a linear phase ramp undetermined (metrics.align_to_truth)
        return score_reconstruction(label, result, data.object, positions, data.probe, wall_s, min_weight_fraction,
                                    register, details=details, remove_amplitude_scale=remove_amplitude_scale,
                                    remove_phase_ramp=bool(details.get("probe_updated")))

    network = score("network", recon, net_s, {
        "backend": bundle.backend, "provider": provider, "load_time_s": load_s, "align": align,
        "time_covers": "inference + |probe|^2-weighted stitching (not loading)"
                       + ("" if align == "none" else f" + the {align!r} overlap solve")})
    refined = control = None
    if refine:
        from ptycho_runtime.inference.scan_refinement import RefineSettings, refine_scan
        from ptycho_runtime.refinement.engine import prepare_backend

        settings = RefineSettings(sweeps=int(refine), **dict(refine_options or {}))
        t0 = time.perf_counter()
        prepare_backend(settings.backend, settings.device)  # loaded before timing, as the bundle is (numba's kernels)
        backend_load_s = time.perf_counter() - t0

        def sweeps_from(start: str, network: Any) -> tuple[Any, float]:
            t0 = time.perf_counter()
            result = refine_scan(network, data.diffraction, positions, data.probe,
                                 dataclasses.replace(settings, start=start), probe_source="the scan's probeGuess")
            return result, time.perf_counter() - t0

        def refine_details(result: Any) -> dict[str, Any]:
            rec = {k: v for k, v in result.refinement.items() if k != "misfit_per_sweep"}
            return {**rec, "iterations": int(rec["sweeps"]), "probe": rec["probe_source"]
                    + ("" if rec.get("probe_updated") else ", fixed")}

        start, start_s = recon, net_s
        if settings.start_groups != "all" and bundle.channels > 1:  # as Bundle.reconstruct(refine=...) starts
            t0 = time.perf_counter()
            start = bundle.reconstruct(data.diffraction, positions, counts=False, batch_size=batch_size,
                                       window=probe_window(data.probe), align=align, groups=settings.start_groups)
            start_s = time.perf_counter() - t0
        polished, refine_s = sweeps_from(settings.start, start)
        network_groups = {"rule": settings.start_groups, "frames": int(data.n),
                          "groups": count_groups(data.xcoords, data.ycoords, bundle.gridsize, settings.start_groups)}
        refined = score("network + refinement", polished, start_s + refine_s,
                        {**refine_details(polished), "network_groups": network_groups, "backend_load_s": backend_load_s,
                         "time_covers": "the network's reconstruction (on the groups network_groups says), then "
                                        "the refinement sweeps from it"})
        alone, alone_s = sweeps_from("flat", recon)
        control = score("refinement from a flat object", alone, alone_s,
                        {**refine_details(alone), "time_covers": "the refinement sweeps"})
    refs = [_reference(data, positions, algorithm, reference_iterations, reference_batch_size,
                       min_weight_fraction, register, progress, remove_amplitude_scale) for algorithm in algorithms]
    ref = refs[0] if refs else None
    report: dict[str, Any] = {
        "bundle": str(Path(bundle.path)),
        "scan": str(Path(scan_path)),
        "n_patterns": int(data.n),
        "N": int(bundle.N),
        "gridsize": int(bundle.gridsize),
        "stitching_window": "|probe|^2 (under 1e-3 of its peak: 0)",
        "min_weight_fraction": float(min_weight_fraction),
        "registration": (f"skimage.registration.phase_cross_correlation, 1/100 px, applied when within "
                         f"±{DEFAULT_MAX_SHIFT_PX:g} px") if register else "off",
        "frc_threshold": f"1/7 ({FRC_THRESHOLD:.4f})",
        "amplitude_scale_removed": bool(remove_amplitude_scale),
        "network": network.summary(),
    }
    if refined is not None:
        report["refined"] = refined.summary()
        report["refine_control"] = control.summary()
        report["network_start_gain"] = {key: refined.metrics[key] - control.metrics[key] for key in GAIN_METRICS}
        report["network_start_verdict"] = start_verdict(report["network_start_gain"], report["refined"].get("start"))
    if ref is not None:
        report["reference"] = ref.summary()
        report["references"] = [r.summary() for r in refs]
        report["speedup"] = ref.wall_time_s / network.wall_time_s if network.wall_time_s > 0 else None
        if refined is not None:
            report["refined_speedup"] = ref.wall_time_s / refined.wall_time_s
    return Evaluation(report=report, network=network, reference=ref, refined=refined, control=control,
                      references=refs)


def _reference(data: Any, positions: np.ndarray, algorithm: str,
               iterations: Optional[int | Mapping[str, int]], batch_size: Optional[int], min_weight_fraction: float,
               register: bool, progress: Optional[Callable[[str], None]],
               remove_amplitude_scale: bool) -> ScoredReconstruction:
    """One pty-chi reconstruction of the scan from a flat object, scored like the network's."""
    from .reference import DEFAULT_ITERATIONS, run_reference

    its = iterations.get(algorithm) if isinstance(iterations, Mapping) else iterations
    its = DEFAULT_ITERATIONS[algorithm] if its is None else int(its)
    t0 = time.perf_counter()

    def report_epochs(done: int, total: int) -> None:
        if progress is not None:
            progress(f"pty-chi {algorithm}: {done}/{total} iterations, {time.perf_counter() - t0:.0f} s")

    # load_npz put the probe in the units of the normalised diffraction: the reference needs no rescaling
    result = run_reference(data.diffraction, positions, data.probe, algorithm, its, batch_size,
                           progress=report_epochs)
    return score_reconstruction(
        "reference", result.reconstruction, data.object, positions, data.probe, result.wall_time_s,
        min_weight_fraction, register, remove_amplitude_scale=remove_amplitude_scale,
        details={"engine": result.engine, "algorithm": result.algorithm, "iterations": result.iterations,
                 "batch_size": result.batch_size, "probe": "known (the scan's probeGuess), fixed",
                 "final_loss": result.loss[-1] if result.loss else None,
                 "time_covers": "building the pty-chi task and its iterations (not the import)"})


# --------------------------------------------------------------------------- figure


def _masked_box(scored: ScoredReconstruction, values: np.ndarray) -> tuple[np.ma.MaskedArray, tuple[float, ...]]:
    box = scored.alignment.box
    img = np.ma.masked_where(~scored.alignment.mask[box], values[box])
    x, y = scored.x_coords[box[1]], scored.y_coords[box[0]]
    return img, (x[0] - 0.5, x[-1] + 0.5, y[-1] + 0.5, y[0] - 0.5)


def _save_atomic(fig: Any, path: Path, dpi: int = 100) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ptycho_runtime.format import atomic_write_path

    FigureCanvasAgg(fig)
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def _title(scored: ScoredReconstruction, name: str) -> str:
    m = scored.metrics
    return (f"{name} ({scored.wall_time_s:.2f} s): SSIM amp {m['amplitude_ssim']:.3f}, "
            f"phase {m['phase_ssim']:.3f}; phase RMSE {m['phase_rmse_rad']:.3f} rad")


def _robust_range(values: np.ndarray, mask: np.ndarray, lo: float = 1.0, hi: float = 99.0) -> tuple[float, float]:
    """The [lo, hi] percentiles of ``values`` over ``mask``: a few edge pixels must not set a colour scale."""
    v = values[mask]
    return float(np.percentile(v, lo)), float(np.percentile(v, hi))


def _widened(limits: tuple[float, float], pad: float) -> tuple[float, float]:
    return limits if limits[1] > limits[0] else (limits[0] - pad, limits[1] + pad)


def write_figure(path: str | os.PathLike, evaluation: Evaluation, title: str = "") -> Path:
    """Truth / each method / each method's error, in amplitude and phase columns, as a PNG written atomically.

    Methods: the network, the network + refinement, the same refinement from a
    flat object (the control), and every reference engine. Every image is
    cropped to its scored region (outside the mask is blank), with axes in
    object pixels. The truth's colour range is its own; a method's amplitude
    range is the truth's widened to that method's 1-99th percentiles (so an
    amplitude outside the truth's range shows, instead of clipping); phases
    share the truth's range (they are drawn next to the truth's phase). Error
    panels share a symmetric range per column; the amplitude error's title
    gives its mean and the global amplitude scale that was removed before
    scoring (``metrics.align_to_truth``: the file's probe scale is arbitrary,
    which made every method's amplitude error a uniform offset).
    Uses a matplotlib ``Figure`` with an Agg canvas: no pyplot state.
    """
    from matplotlib.figure import Figure

    path = Path(path)
    net, refined = evaluation.network, evaluation.refined
    t, m = net.alignment.truth, net.alignment.mask
    truth_amp = _widened((float(np.abs(t[m]).min()), float(np.abs(t[m]).max())), 0.5)
    ph_t = np.angle(t)
    ph_lim = _widened((float(ph_t[m].min()), float(ph_t[m].max())), 1.0)

    def phase_near_truth(s: ScoredReconstruction) -> np.ndarray:
        return np.angle(s.alignment.truth) + np.angle(s.alignment.recon * np.conj(s.alignment.truth))

    rows: list[tuple[str, ScoredReconstruction, np.ndarray, np.ndarray, str, tuple[float, float]]] = [
        ("truth", net, np.abs(t), ph_t, "value", truth_amp)]
    methods = [(_title(net, "network"), "network", net)]
    if refined is not None:
        sweeps = refined.details.get("sweeps", refined.details.get("iterations"))
        methods.append((_title(refined, f"network + {sweeps} refinement sweeps"), "network + refinement", refined))
    if evaluation.control is not None:
        sweeps = evaluation.control.details.get("sweeps", evaluation.control.details.get("iterations"))
        methods.append((_title(evaluation.control, f"flat object + {sweeps} sweeps (control)"), "control",
                        evaluation.control))
    references = evaluation.references or ([evaluation.reference] if evaluation.reference is not None else [])
    for ref in references:
        engine = f"{ref.details.get('engine', 'reference')}, {ref.details.get('iterations', '?')} it"
        methods.append((_title(ref, engine), ref.details.get("engine", "reference"), ref))
    for heading, _, s in methods:
        amp = np.abs(s.alignment.recon)
        own = _robust_range(amp, s.alignment.mask)
        rows.append((heading, s, amp, phase_near_truth(s), "value",
                     (min(truth_amp[0], own[0]), max(truth_amp[1], own[1]))))
    err_imgs = []
    for _, name, s in methods:
        a = np.abs(s.alignment.recon) - np.abs(s.alignment.truth)
        p = np.angle(s.alignment.recon * np.conj(s.alignment.truth))
        label = (f"{name} error (recon − truth)\nmean amplitude error {float(np.mean(a[s.alignment.mask])):+.3f}, "
                 f"after removing a global amplitude scale ×{s.alignment.amplitude_scale:.3f}")
        err_imgs.append((label, s, a, p))
    amp_err = max(float(np.percentile(np.abs(a[s.alignment.mask]), 99)) for _, s, a, _ in err_imgs) or 1e-6
    ph_err = max(float(np.percentile(np.abs(p[s.alignment.mask]), 99)) for _, s, _, p in err_imgs) or 1e-6
    for label, s, a, p in err_imgs:
        rows.append((label, s, a, p, "error", (-amp_err, amp_err)))

    fig = Figure(figsize=(10, 3.4 * len(rows)), constrained_layout=True)
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for i, (label, s, amp, phase, kind, amp_lim) in enumerate(rows):
        for j, (values, what) in enumerate(((amp, "amplitude"), (phase, "phase (rad)"))):
            ax = axes[i, j]
            img, extent = _masked_box(s, values)
            if kind == "value":
                cmap, (lo, hi) = ("gray", amp_lim) if j == 0 else ("viridis", ph_lim)
            else:
                cmap, (lo, hi) = "RdBu_r", amp_lim if j == 0 else (-ph_err, ph_err)
            im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
            ax.set_title(f"{label}\n{what}" if j == 0 else what, fontsize=9, loc="left" if j == 0 else "center")
            ax.set_xlabel("x (object pixels)", fontsize=8)
            ax.set_ylabel("y (object pixels)", fontsize=8)
            ax.tick_params(labelsize=7)
            fig.colorbar(im, ax=ax, shrink=0.85)
    fig.suptitle(title or "evaluation against the true object (global phase removed, registered)", fontsize=10)
    _save_atomic(fig, path)
    return path
