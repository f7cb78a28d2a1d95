"""An iterative reference reconstruction with pty-chi (the APS engines), scan's probe, fixed positions.

``ptycho-export evaluate --reference`` puts a network's reconstruction next to
what a standard iterative engine gets from the same scan from a flat object:
that is the comparison (quality, and speed-up over iterative) users of
PtychoPINN ask for. pty-chi (``pip install ptychi``, PyTorch based) is what
ptychodus uses as its iterative back end; it is an optional extra
(``pip install 'ptycho-export[reference]'``).

The pty-chi glue (units, the half-pixel origin, the torchvision stand-in,
torch's global defaults) lives once, in the runtime's second refinement
engine ``ptycho_runtime.refinement.ptychi_engine``; this module runs it from a flat
object on a canvas sized to the scan and reports what it cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ptycho_runtime.reconstruction.stitching import Reconstruction, StitchCanvas, canvas_bounds
from ptycho_runtime.refinement.ptychi_engine import PtychiUnavailableError, run_ptychi
from ptycho_runtime.refinement.ptychi_engine import import_ptychi as _import_ptychi

__all__ = ["ALGORITHMS", "DEFAULT_BATCH_SIZE", "DEFAULT_ITERATIONS", "ReferenceResult", "ReferenceUnavailableError",
           "import_ptychi", "run_reference"]

ALGORITHMS = ("epie", "lsqml")
DEFAULT_ITERATIONS = {"epie": 100, "lsqml": 200}
"""Epochs (passes over all positions). ePIE 100: the comparison the project has always reported. LSQML 200: the
issue-17 bar for "run to convergence" (docs/fidelity.md has the measured curve)."""
DEFAULT_BATCH_SIZE = {"epie": 16, "lsqml": 32}
"""Positions per update. Mini-batch ePIE (16) converges almost as far per epoch as sequential ePIE (1) and
runs ~4x faster per epoch in pty-chi on a CPU."""
INSTALL_HINT = "install it with: pip install 'ptycho-export[reference]' (or: pip install ptychi)"


class ReferenceUnavailableError(PtychiUnavailableError):
    """pty-chi is not installed (or cannot be imported here)."""


@dataclass
class ReferenceResult:
    """A pty-chi reconstruction on the scan's object-pixel grid, with what it cost."""

    reconstruction: Reconstruction
    algorithm: str
    iterations: int
    batch_size: int
    wall_time_s: float
    engine: str
    loss: list[float] = field(default_factory=list)


def import_ptychi() -> tuple[Any, Any, str]:
    """``(ptychi.api, PtychographyTask, version)``; ReferenceUnavailableError with the install command if absent."""
    try:
        return _import_ptychi()
    except PtychiUnavailableError as exc:
        raise ReferenceUnavailableError(f"the iterative reference: {exc}; {INSTALL_HINT}") from None


def run_reference(diffraction: np.ndarray, positions: np.ndarray, probe: np.ndarray, algorithm: str = "epie",
                  iterations: Optional[int] = None, batch_size: Optional[int] = None, seed: int = 0,
                  progress: Optional[Callable[[int, int], None]] = None) -> ReferenceResult:
    """Reconstruct a scan with pty-chi's ePIE or LSQML from a flat object, the probe known and fixed.

    Args:
        diffraction: [n, N, N] normalised amplitudes (the NPZ contract), DC at the centre.
        positions: [n, 2] (x, y) frame centres in object pixels (frame pixel (N−1)/2).
        probe: [N, N] complex, at the scale the amplitudes were normalised with.
        algorithm: "epie" or "lsqml".
        iterations / batch_size: epochs and positions per update (defaults in
            ``DEFAULT_ITERATIONS`` / ``DEFAULT_BATCH_SIZE``).
        seed: pty-chi's random seed (batch order).
        progress: ``progress(done, total)`` after every ~5% of the epochs (pty-chi runs minutes on a CPU).

    Returns a ``ReferenceResult`` whose reconstruction lives on the same kind of
    canvas as ``Bundle.reconstruct`` (``x_coords``/``y_coords`` in object
    pixels) with ``weight`` = Σ|probe|² over positions (the illumination).
    ``wall_time_s`` covers building the task and running it (not the import).
    """
    algorithm = algorithm.lower()
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown reference algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    iterations = DEFAULT_ITERATIONS[algorithm] if iterations is None else int(iterations)
    batch_size = DEFAULT_BATCH_SIZE[algorithm] if batch_size is None else int(batch_size)
    if iterations < 1 or batch_size < 1:
        raise ValueError(f"iterations and batch_size must be >= 1 (got {iterations}, {batch_size})")
    d = np.asarray(diffraction, dtype=np.float64)
    pos = np.asarray(positions, dtype=np.float64)
    p = np.asarray(probe)
    if d.ndim != 3 or d.shape[1] != d.shape[2]:
        raise ValueError(f"diffraction must have shape [n, N, N] (got {list(d.shape)})")
    n, N = d.shape[0], d.shape[1]
    if pos.shape != (n, 2):
        raise ValueError(f"positions must have shape [{n}, 2] to match the diffraction (got {list(pos.shape)})")
    if p.shape != (N, N):
        raise ValueError(f"probe must have shape ({N}, {N}) to match the frames (got {p.shape})")
    import_ptychi()
    (x0, y0), (H, W) = canvas_bounds(pos, N)  # the engine pads for pty-chi's sub-pixel reads itself
    canvas = StitchCanvas((H, W), N, (x0, y0), window=np.abs(p) ** 2)
    canvas.add(np.ones((n, N, N), np.complex64), pos)
    lit = canvas.result()  # weight = the illumination Σ|P|²; object 1 where lit: the flat start
    flat = Reconstruction(object=np.ones((H, W), np.complex64), weight=lit.weight, x_coords=lit.x_coords,
                          y_coords=lit.y_coords)
    recon, _, record = run_ptychi(d, pos, p, flat, algorithm=algorithm, iterations=iterations,
                                  batch_size=batch_size, seed=seed, progress=progress)
    return ReferenceResult(reconstruction=recon, algorithm=algorithm, iterations=iterations, batch_size=batch_size,
                           wall_time_s=record["wall_s"], engine=f"pty-chi {record['engine_version']} "
                           f"{record['algorithm']}", loss=record["loss"])
