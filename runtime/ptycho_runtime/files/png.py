"""A reconstruction as a PNG: amplitude and phase side by side, for people (the HDF5 file is for programs)."""

from __future__ import annotations

import os

import numpy as np

from ..format import atomic_write_path
from ..reconstruction.stitching import Reconstruction

PNG_HINT = "writing a PNG needs matplotlib: pip install 'ptycho-runtime[png]'"


def check_png_support() -> None:
    """Raise ``ImportError`` naming the extra when matplotlib is missing (call before a long run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(PNG_HINT) from None


def write_png(path: str | os.PathLike, recon: Reconstruction, title: str = "") -> None:
    """Amplitude and phase side by side, with colour bars; written atomically.

    A ``matplotlib.figure.Figure`` drawn on its own Agg canvas: no pyplot and
    no ``matplotlib.use``, so a host application's backend and figure registry
    are left alone. ``ImportError`` (naming the extra) without matplotlib.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(PNG_HINT) from None
    x, y = recon.x_coords, recon.y_coords
    extent = (x[0] - 0.5, x[-1] + 0.5, y[-1] + 0.5, y[0] - 0.5)
    covered = recon.covered
    amp = np.ma.masked_where(~covered, recon.amplitude)
    # ptychography cannot tell the global phase: show the phase relative to the weighted mean phasor, so
    # an object near ±π does not wrap across the whole image (the HDF5 output keeps the raw phase)
    offset = np.angle(np.sum(recon.object[covered] * recon.weight[covered])) if covered.any() else 0.0
    phase = np.ma.masked_where(~covered, np.angle(recon.object * np.exp(-1j * offset)))
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = ((axes[0], amp, "amplitude", "gray"),
              (axes[1], phase, f"phase (rad, global offset {offset:+.2f} removed)", "viridis"))
    for ax, img, label, cmap in panels:
        im = ax.imshow(img, cmap=cmap, extent=extent, interpolation="nearest")
        ax.set_title(label)
        ax.set_xlabel("x (pixels)")
        ax.set_ylabel("y (pixels)")
        fig.colorbar(im, ax=ax, shrink=0.9)
    if title:
        fig.suptitle(title)
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
