"""A reconstruction as a PNG: amplitude and phase side by side, for people (the HDF5 file is for programs).

The colour ranges come from the scanned area only, and from robust
percentiles there: the rim of a stitched object is lit by the probe's dim
tails, so its values are barely determined and a handful of them (amplitudes
of 10 where the object is 0.5–1) would otherwise set the scale and leave the
object itself one flat grey. Pixels outside the scanned area are drawn blank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..format import atomic_write_path
from ..reconstruction.stitching import Reconstruction

__all__ = ["COLOUR_PERCENTILES", "PNG_HINT", "SCANNED_WEIGHT_FRACTION", "PngPanels", "check_png_support",
           "png_panels", "scanned_pixels", "write_png"]

PNG_HINT = "writing a PNG needs matplotlib: pip install 'ptycho-runtime[png]'"

SCANNED_WEIGHT_FRACTION = 0.2
"""A pixel is drawn when its stitching weight is at least this fraction of the maximum weight (``evaluate`` scores
pixels lit by at least 0.2 of one exposure's peak; a PNG has no probe, so the canvas's own maximum stands in)."""

COLOUR_PERCENTILES = (1.0, 99.0)
"""The percentiles of the drawn pixels that set each colour range (as ``evaluate``'s figure does)."""


@dataclass(frozen=True)
class PngPanels:
    """What ``write_png`` draws: the two images (masked outside ``scanned``) and their colour limits.

    ``phase`` is relative to ``phase_offset``, the phase of the weighted mean
    phasor over the scanned pixels (the global phase is not measurable).
    """

    amplitude: np.ma.MaskedArray
    phase: np.ma.MaskedArray
    amplitude_limits: tuple[float, float]
    phase_limits: tuple[float, float]
    phase_offset: float
    scanned: np.ndarray


def check_png_support() -> None:
    """Raise ``ImportError`` naming the extra when matplotlib is missing (call before a long run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(PNG_HINT) from None


def scanned_pixels(recon: Reconstruction, fraction: float = SCANNED_WEIGHT_FRACTION) -> np.ndarray:
    """Pixels whose stitching weight is ≥ ``fraction`` × the maximum weight (none when nothing is covered)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1) (got {fraction})")
    weight = np.asarray(recon.weight, dtype=np.float64)
    top = float(weight.max()) if weight.size else 0.0
    if not top > 0:
        return np.zeros(weight.shape, dtype=bool)
    return (weight > 0) & (weight >= fraction * top)


def _limits(values: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """Robust [lo, hi] of ``values`` over ``mask``, never empty (a flat image gets a small range around its value)."""
    v = values[mask]
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = (float(q) for q in np.percentile(v, percentiles))
    if hi > lo:
        return lo, hi
    pad = max(abs(lo) * 1e-3, 1e-6)
    return lo - pad, hi + pad


def png_panels(recon: Reconstruction, fraction: float = SCANNED_WEIGHT_FRACTION,
               percentiles: tuple[float, float] = COLOUR_PERCENTILES) -> PngPanels:
    """The images and colour limits of ``write_png`` (exposed so the choice can be checked without pixels)."""
    scanned = scanned_pixels(recon, fraction)
    obj = np.asarray(recon.object)
    weight = np.asarray(recon.weight, dtype=np.float64)
    # ptychography cannot tell the global phase: show the phase relative to the weighted mean phasor, so
    # an object near ±π does not wrap across the whole image (the HDF5 output keeps the raw phase)
    offset = float(np.angle(np.sum(obj[scanned] * weight[scanned]))) if scanned.any() else 0.0
    amplitude = np.abs(obj)
    phase = np.angle(obj * np.exp(-1j * offset))
    return PngPanels(amplitude=np.ma.masked_where(~scanned, amplitude),
                     phase=np.ma.masked_where(~scanned, phase),
                     amplitude_limits=_limits(amplitude, scanned, percentiles),
                     phase_limits=_limits(phase, scanned, percentiles),
                     phase_offset=offset, scanned=scanned)


def write_png(path: str | os.PathLike, recon: Reconstruction, title: str = "") -> None:
    """Amplitude and phase side by side, with colour bars; written atomically.

    Colour limits and mask are ``png_panels``'s: the 1st–99th percentiles of
    the scanned pixels (weight ≥ 20% of the maximum); other pixels are blank.
    A ``matplotlib.figure.Figure`` drawn on its own Agg canvas: no pyplot and
    no ``matplotlib.use``, so a host application's backend and figure registry
    are left alone. ``ImportError`` (naming the extra) without matplotlib.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(PNG_HINT) from None
    panels = png_panels(recon)
    x, y = recon.x_coords, recon.y_coords
    extent = (x[0] - 0.5, x[-1] + 0.5, y[-1] + 0.5, y[0] - 0.5)
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    lo, hi = COLOUR_PERCENTILES
    note = f"colours: {lo:g}–{hi:g}th percentile of the scanned area"
    drawn = ((axes[0], panels.amplitude, panels.amplitude_limits, f"amplitude\n{note}", "gray"),
             (axes[1], panels.phase, panels.phase_limits,
              f"phase (rad, global offset {panels.phase_offset:+.2f} removed)\n{note}", "viridis"))
    for ax, img, (vmin, vmax), label, cmap in drawn:
        im = ax.imshow(img, cmap=colormaps[cmap].with_extremes(bad="white"), vmin=vmin, vmax=vmax,
                       extent=extent, interpolation="nearest")
        ax.set_title(label)
        ax.set_xlabel("x (pixels)")
        ax.set_ylabel("y (pixels)")
        fig.colorbar(im, ax=ax, shrink=0.9, extend="both")
    if title:
        fig.suptitle(title)
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
