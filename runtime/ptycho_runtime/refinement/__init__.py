"""Refinement of the network's object against the measured data, in the runtime.

- ``refine`` / ``Refiner`` (``engine``): the built-in batched engine —
  batches of non-overlapping frames (sequential ePIE's update, vectorised),
  sweep-level momentum, optional probe refinement — on a numpy, torch or
  onnxruntime backend; ``engine="ptychi"`` hands over to pty-chi.
- ``refine_epie`` (``epie``): the original one-frame-at-a-time numpy loop,
  kept as the reference the batched engine is measured against.
- ``RefineResult`` / ``RefinementCancelled`` (``result``): what every engine returns or raises.

Positions stay fixed in every engine here.
"""

from .engine import DEFAULT_ALPHA, DEFAULT_MOMENTUM, DEFAULT_SWEEPS, Refiner, refine
from .epie import DEFAULT_REFINE_ITERATIONS, far_field_misfit, refine_epie
from .result import RefinementCancelled, RefineResult

__all__ = ["DEFAULT_ALPHA", "DEFAULT_MOMENTUM", "DEFAULT_REFINE_ITERATIONS", "DEFAULT_SWEEPS", "RefineResult",
           "RefinementCancelled", "Refiner", "far_field_misfit", "refine", "refine_epie"]
