"""What a refinement returns, shared by every engine (the built-in one and pty-chi's).

Kept apart from the engines so that each engine module can import it without
importing the others (the pty-chi engine needs torch; the built-in one must not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np

from ..reconstruction.stitching import Reconstruction

ProgressFn = Callable[[int, int], None]
CancelFn = Union[Callable[[], bool], Any]  # a callable returning True, or anything with is_set() (threading.Event)


@dataclass
class RefineResult:
    """A refined object and how it was made.

    ``reconstruction`` is on the starting reconstruction's grid (same
    ``x_coords``/``y_coords``, weights, pixel size and centre); ``probe`` is
    the updated probe when ``record["probe_updated"]``, else the input probe.
    ``record`` is plain JSON-able data (engine, backend, device, sweeps run,
    batching, batch count, momentum, probe_updated, misfit per sweep, wall_s,
    cancelled) that callers store beside the object in their output files.
    """

    reconstruction: Reconstruction
    probe: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)


class RefinementCancelled(RuntimeError):
    """The host's ``cancel`` said stop; raised between batches.

    ``partial`` holds the result so far (the sweeps finished before the
    cancelled one, plus the batches of it that ran), with
    ``record["cancelled"] = True``, so a live display can still show it.
    """

    def __init__(self, message: str, partial: Optional[RefineResult] = None) -> None:
        super().__init__(message)
        self.partial = partial


def cancel_requested(cancel: Optional[CancelFn]) -> bool:
    """True when ``cancel`` (None, a callable, or an object with ``is_set()``) says stop."""
    if cancel is None:
        return False
    return bool(cancel.is_set() if hasattr(cancel, "is_set") else cancel())
