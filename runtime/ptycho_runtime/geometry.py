"""Where a scan position puts its frame on the object: the frame-centre convention, defined once.

A scan position (x, y) in object pixels names the object pixel under the
frame's *centre*. Which frame pixel is the centre is a convention, and the
tools our users have disagree by half a pixel:

- ``"(N-1)/2"`` — the geometric centre of the N×N array. PtychoPINN's NPZ
  files and ptychodus (``ptychodus/api/interpolate.py``) use it, so it is the
  default everywhere in this project: frame pixel (r, c) sits at object pixel
  ``(y − (N−1)/2 + r, x − (N−1)/2 + c)``.
- ``"N/2"`` — the FFT centre (the pixel where ``fftshift`` puts DC). Files
  written by ptycho-export before 0.2 used it.

Readers take the convention as an explicit argument and convert positions to
the default with ``to_default_centre``; everything inside (patch extraction,
stitching, the canvas) then uses ``frame_origin`` and nothing else, so a
half-pixel mistake can only be made in one place.
"""

from __future__ import annotations

import numpy as np

CENTRE_CONVENTIONS = ("(N-1)/2", "N/2")
DEFAULT_CENTRE = "(N-1)/2"


def check_centre(convention: str) -> str:
    """The convention, validated (ValueError naming the allowed values otherwise)."""
    if convention not in CENTRE_CONVENTIONS:
        raise ValueError(f"frame centre convention must be one of {', '.join(map(repr, CENTRE_CONVENTIONS))} "
                         f"(got {convention!r}); PtychoPINN NPZ and ptychodus use '(N-1)/2'")
    return convention


def frame_centre(N: int, convention: str = DEFAULT_CENTRE) -> float:
    """The frame pixel (row = column) that a position names: (N−1)/2 or N/2."""
    return (N - 1) / 2.0 if check_centre(convention) == "(N-1)/2" else N / 2.0


def frame_origin(positions: np.ndarray, N: int) -> np.ndarray:
    """Object-pixel coordinate of frame pixel (0, 0) for positions in the default convention."""
    return np.asarray(positions, dtype=np.float64) - frame_centre(N)


def to_default_centre(positions: np.ndarray, N: int, convention: str) -> np.ndarray:
    """Positions given in ``convention`` → the same frames' positions in the default (N−1)/2 convention.

    A frame whose position is x in the N/2 convention starts at x − N/2, so in
    the default convention its position is x − 1/2.
    """
    shift = frame_centre(N, DEFAULT_CENTRE) - frame_centre(N, convention)
    pos = np.asarray(positions, dtype=np.float64)
    return pos + shift if shift else pos
