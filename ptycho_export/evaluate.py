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

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

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
                          "phase_offset_rad": self.alignment.phase_offset_rad},
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


def illumination(positions: np.ndarray, probe: np.ndarray, x_coords: np.ndarray, y_coords: np.ndarray) -> np.ndarray:
    """Σ over positions of |probe|² placed at each position, on the grid ``x_coords`` × ``y_coords``.

    Same placement as the runtime's stitching (``ptycho_runtime.stitching.StitchCanvas``,
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
                         register: bool = True, details: Optional[dict[str, Any]] = None) -> ScoredReconstruction:
    """Mask, align and score one ``Reconstruction`` (object, weight, x_coords, y_coords) against the truth."""
    truth, inside = sample_object(truth_object, recon.x_coords, recon.y_coords)
    light = illumination(positions, probe, recon.x_coords, recon.y_coords)
    peak = float(np.max(np.abs(np.asarray(probe)) ** 2))
    mask = scanned_mask(light, inside, min_weight_fraction, level=peak) & (np.asarray(recon.weight) > 0)
    if not mask.any():
        raise ValueError(f"{label}: no reconstructed pixel overlaps the truth object with at least "
                         f"{min_weight_fraction:g} of the peak illumination (check that the positions are in the "
                         "objectGuess's pixel frame, or lower --min-weight)")
    alignment = align_to_truth(recon.object, truth, mask, register_shift=register)
    return ScoredReconstruction(label=label, alignment=alignment, metrics=image_quality(alignment),
                                wall_time_s=float(wall_time_s), x_coords=np.asarray(recon.x_coords),
                                y_coords=np.asarray(recon.y_coords), details=dict(details or {}))


def evaluate(bundle_path: str | os.PathLike, scan_path: str | os.PathLike, *, counts: bool = False,
             reference: Optional[str] = None, reference_iterations: Optional[int] = None,
             reference_batch_size: Optional[int] = None, min_weight_fraction: float = DEFAULT_MIN_WEIGHT_FRACTION,
             backend: str = "auto", device: str = "auto", batch_size: Optional[int] = None,
             register: bool = True, refine: int = 0) -> Evaluation:
    """Reconstruct ``scan_path`` with the bundle (and optionally pty-chi) and score both against the truth.

    ``refine`` > 0 also scores the network's object after that many ePIE
    iterations with the known probe (``ptycho_runtime.refinement``), timed
    from the start of the network's reconstruction, and, as the control that
    shows what the network's start is worth, the same iterations from a flat
    object (``refine_control``).

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
    if reference is not None:
        from .reference import import_ptychi

        import_ptychi()  # fail before the inference if pty-chi is missing
    positions = np.stack([data.xcoords, data.ycoords], axis=1)
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_path, backend=backend, device=device)
    load_s = time.perf_counter() - t0
    if bundle.N != data.N:
        raise ValueError(f"the scan's frames are {data.N}×{data.N} but the bundle's model was trained with "
                         f"N={bundle.N}: evaluate it on a scan with {bundle.N}×{bundle.N} frames")
    t0 = time.perf_counter()
    recon = bundle.reconstruct(data.diffraction, positions, counts=False, batch_size=batch_size,
                               window=probe_window(data.probe))  # load_npz normalised the amplitudes
    net_s = time.perf_counter() - t0
    provider = bundle.providers[0] if bundle.providers else bundle.backend
    network = score_reconstruction(
        "network", recon, data.object, positions, data.probe, net_s, min_weight_fraction, register,
        details={"backend": bundle.backend, "provider": provider, "load_time_s": load_s,
                 "time_covers": "inference + |probe|^2-weighted stitching (not loading)"})
    refined = control = None
    if refine:
        from ptycho_runtime.reconstruction.stitching import Reconstruction
        from ptycho_runtime.refinement import refine_epie

        details = {"iterations": int(refine), "probe": "known (the scan's probeGuess), fixed"}
        t0 = time.perf_counter()
        polished = refine_epie(recon, data.diffraction, positions, data.probe, iterations=refine)
        refined = score_reconstruction(
            "network + ePIE", polished, data.object, positions, data.probe, net_s + time.perf_counter() - t0,
            min_weight_fraction, register,
            details={**details, "time_covers": "the network's reconstruction, then the ePIE iterations from it"})
        flat = Reconstruction(np.ones_like(recon.object), recon.weight, recon.x_coords, recon.y_coords)
        t0 = time.perf_counter()
        alone = refine_epie(flat, data.diffraction, positions, data.probe, iterations=refine)
        control = score_reconstruction(
            "ePIE from a flat object", alone, data.object, positions, data.probe, time.perf_counter() - t0,
            min_weight_fraction, register, details={**details, "time_covers": "the ePIE iterations"})
    ref = None
    if reference is not None:
        from .reference import run_reference

        # load_npz put the probe in the units of the normalised diffraction: the reference needs no rescaling
        result = run_reference(data.diffraction, positions, data.probe, reference, reference_iterations,
                               reference_batch_size)
        ref = score_reconstruction(
            "reference", result.reconstruction, data.object, positions, data.probe, result.wall_time_s,
            min_weight_fraction, register,
            details={"engine": result.engine, "algorithm": result.algorithm, "iterations": result.iterations,
                     "batch_size": result.batch_size, "probe": "known (the scan's probeGuess), fixed",
                     "final_loss": result.loss[-1] if result.loss else None,
                     "time_covers": "building the pty-chi task and its iterations (not the import)"})
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
        "network": network.summary(),
    }
    if refined is not None:
        report["refined"] = refined.summary()
        report["refine_control"] = control.summary()
    if ref is not None:
        report["reference"] = ref.summary()
        report["speedup"] = ref.wall_time_s / network.wall_time_s if network.wall_time_s > 0 else None
        if refined is not None:
            report["refined_speedup"] = ref.wall_time_s / refined.wall_time_s
    return Evaluation(report=report, network=network, reference=ref, refined=refined)


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


def write_figure(path: str | os.PathLike, evaluation: Evaluation, title: str = "") -> Path:
    """Truth / network / refined / reference / error rows (amplitude, phase columns) as a PNG, written atomically.

    Every image is cropped to its scored region (outside the mask is blank),
    with axes in object pixels; truth and reconstructions share colour limits
    (the truth's range), errors a symmetric one. Uses a matplotlib ``Figure``
    with an Agg canvas: no global backend switch, no pyplot state.
    """
    from matplotlib.figure import Figure

    path = Path(path)
    net, ref, refined = evaluation.network, evaluation.reference, evaluation.refined
    t, m = net.alignment.truth, net.alignment.mask
    amp_lim = (float(np.abs(t[m]).min()), float(np.abs(t[m]).max()))
    ph_t = np.angle(t)
    ph_lim = (float(ph_t[m].min()), float(ph_t[m].max()))
    if amp_lim[1] <= amp_lim[0]:
        amp_lim = (amp_lim[0] - 0.5, amp_lim[1] + 0.5)
    if ph_lim[1] <= ph_lim[0]:
        ph_lim = (ph_lim[0] - 1.0, ph_lim[1] + 1.0)

    def phase_near_truth(s: ScoredReconstruction) -> np.ndarray:
        return np.angle(s.alignment.truth) + np.angle(s.alignment.recon * np.conj(s.alignment.truth))

    rows: list[tuple[str, ScoredReconstruction, np.ndarray, np.ndarray, str]] = [
        ("truth", net, np.abs(t), ph_t, "value")]
    methods = [(_title(net, "network"), "network", net)]
    if refined is not None:
        methods.append((_title(refined, f"network + {refined.details['iterations']} ePIE iterations"),
                        "network + ePIE", refined))
    if ref is not None:
        methods.append((_title(ref, ref.details.get("engine", "reference")), "reference", ref))
    for heading, _, s in methods:
        rows.append((heading, s, np.abs(s.alignment.recon), phase_near_truth(s), "value"))
    errors = [(f"{name} error (recon − truth)", s) for _, name, s in methods]
    err_imgs = []
    for label, s in errors:
        a = np.abs(s.alignment.recon) - np.abs(s.alignment.truth)
        p = np.angle(s.alignment.recon * np.conj(s.alignment.truth))
        err_imgs.append((label, s, a, p))
    amp_err = max(float(np.percentile(np.abs(a[s.alignment.mask]), 99)) for _, s, a, _ in err_imgs) or 1e-6
    ph_err = max(float(np.percentile(np.abs(p[s.alignment.mask]), 99)) for _, s, _, p in err_imgs) or 1e-6
    for label, s, a, p in err_imgs:
        rows.append((label, s, a, p, "error"))

    fig = Figure(figsize=(10, 3.4 * len(rows)), constrained_layout=True)
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for i, (label, s, amp, phase, kind) in enumerate(rows):
        for j, (values, what) in enumerate(((amp, "amplitude"), (phase, "phase (rad)"))):
            ax = axes[i, j]
            img, extent = _masked_box(s, values)
            if kind == "value":
                cmap, (lo, hi) = ("gray", amp_lim) if j == 0 else ("viridis", ph_lim)
            else:
                lim = amp_err if j == 0 else ph_err
                cmap, (lo, hi) = "RdBu_r", (-lim, lim)
            im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
            ax.set_title(f"{label}\n{what}" if j == 0 else what, fontsize=9, loc="left" if j == 0 else "center")
            ax.set_xlabel("x (object pixels)", fontsize=8)
            ax.set_ylabel("y (object pixels)", fontsize=8)
            ax.tick_params(labelsize=7)
            fig.colorbar(im, ax=ax, shrink=0.85)
    fig.suptitle(title or "evaluation against the true object (global phase removed, registered)", fontsize=10)
    _save_atomic(fig, path)
    return path
