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

The object grid (``ObjectGrid``) is the other half of "where": the host's
object array, its pixel size and the metres of its centre, in ptychodus's
convention, so positions in metres land where the host expects them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

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


# --------------------------------------------------------------------------- the object grid

POSITION_UNITS = ("pixels", "metres")


@dataclass(frozen=True)
class ObjectGrid:
    """The host's object array: where each object pixel is, in pixels and in metres.

    A host such as ptychodus owns the object grid and hands the runtime scan
    positions in metres; the reconstruction must come back on *that* grid, or
    it cannot be compared with, or replace, the host's object. The convention
    is ptychodus's (``ObjectGeometry.map_probe_positions_to_object_x_px``):
    object pixel column u sits at ``x = centre_x + pixel_x · (u − (W−1)/2)``
    metres, and likewise for rows.

    ``shape`` (H, W) may be None: the canvas is then sized to the scan, and
    object pixel 0 is at ``centre_m`` (there is no array centre yet).
    ``pixel_size_m`` (x, y) — width and height of one pixel — may be None for
    a grid known in pixels only; metre conversions then raise ``ValueError``.
    """

    shape: Optional[tuple[int, int]] = None
    pixel_size_m: Optional[tuple[float, float]] = None
    centre_m: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.shape is not None:
            h, w = (int(v) for v in self.shape)
            if h < 1 or w < 1 or (h, w) != tuple(self.shape):
                raise ValueError(f"object grid shape must be two positive integers (H, W) (got {self.shape!r})")
            object.__setattr__(self, "shape", (h, w))
        if self.pixel_size_m is not None:
            px = self.pixel_size_m
            px, py = (float(px), float(px)) if np.isscalar(px) else (float(px[0]), float(px[1]))
            if not (math.isfinite(px) and math.isfinite(py) and px > 0 and py > 0):
                raise ValueError(f"pixel_size_m must be finite and > 0 (got {self.pixel_size_m!r})")
            object.__setattr__(self, "pixel_size_m", (px, py))
        cx, cy = (float(v) for v in self.centre_m)
        if not (math.isfinite(cx) and math.isfinite(cy)):
            raise ValueError(f"centre_m must be finite (got {self.centre_m!r})")
        object.__setattr__(self, "centre_m", (cx, cy))

    @property
    def centre_px(self) -> tuple[float, float]:
        """Object-pixel coordinate (x, y) of ``centre_m``: ((W−1)/2, (H−1)/2), or (0, 0) without a shape."""
        if self.shape is None:
            return 0.0, 0.0
        return (self.shape[1] - 1) / 2.0, (self.shape[0] - 1) / 2.0

    def _pixel(self) -> tuple[float, float]:
        if self.pixel_size_m is None:
            raise ValueError("this object grid has no pixel_size_m, so positions in metres cannot be placed on it; "
                             "give the object pixel size in metres")
        return self.pixel_size_m

    def to_pixels(self, positions_m: np.ndarray) -> np.ndarray:
        """Positions (x, y) in metres [..., 2] → object pixels [..., 2] on this grid."""
        pos = np.asarray(positions_m, dtype=np.float64)
        if pos.shape[-1:] != (2,):
            raise ValueError(f"positions must have a last axis of 2 as (x, y) (got {list(pos.shape)})")
        (px, py), (cx, cy), (ux, uy) = self._pixel(), self.centre_m, self.centre_px
        return np.stack([(pos[..., 0] - cx) / px + ux, (pos[..., 1] - cy) / py + uy], axis=-1)

    def to_metres(self, positions_px: np.ndarray) -> np.ndarray:
        """Object pixels (x, y) [..., 2] → metres [..., 2] (the inverse of ``to_pixels``)."""
        pos = np.asarray(positions_px, dtype=np.float64)
        (px, py), (cx, cy), (ux, uy) = self._pixel(), self.centre_m, self.centre_px
        return np.stack([(pos[..., 0] - ux) * px + cx, (pos[..., 1] - uy) * py + cy], axis=-1)

    def centre_of(self, origin: tuple[float, float], shape: tuple[int, int]) -> tuple[float, float]:
        """Metres of the array centre of a canvas whose pixel (0, 0) is object pixel ``origin`` (x0, y0)."""
        c = self.to_metres(np.array([origin[0] + (shape[1] - 1) / 2.0, origin[1] + (shape[0] - 1) / 2.0]))
        return float(c[0]), float(c[1])


def make_grid(grid: Optional[ObjectGrid] = None, object_shape: Optional[tuple[int, int]] = None,
              pixel_size_m: Optional[float | tuple[float, float]] = None,
              object_centre_m: Optional[tuple[float, float]] = None) -> Optional[ObjectGrid]:
    """One ObjectGrid from a ready value or its parts (None when nothing is given: a canvas sized to the scan)."""
    if grid is not None:
        if object_shape is not None or pixel_size_m is not None or object_centre_m is not None:
            raise ValueError("give either grid (an ObjectGrid) or object_shape/pixel_size_m/object_centre_m, not both")
        if not isinstance(grid, ObjectGrid):
            raise TypeError(f"grid must be a ptycho_runtime.ObjectGrid (got {type(grid).__name__})")
        return grid
    if object_shape is None and pixel_size_m is None and object_centre_m is None:
        return None
    return ObjectGrid(None if object_shape is None else tuple(object_shape), pixel_size_m,
                      (0.0, 0.0) if object_centre_m is None else tuple(object_centre_m))


def scan_positions_px(positions: np.ndarray, N: int, units: str = "pixels",
                      grid: Optional[ObjectGrid] = None, convention: str = DEFAULT_CENTRE) -> np.ndarray:
    """A host's scan positions → object pixels in the default frame-centre convention.

    ``units``: "pixels" (object pixels of ``grid``, or of the host's own frame)
    or "metres" (placed with ``grid``'s pixel size and centre). ``convention``
    names the frame pixel a position points at (see the top of this module).
    """
    if units not in POSITION_UNITS:
        raise ValueError(f"units must be one of {', '.join(map(repr, POSITION_UNITS))} (got {units!r})")
    pos = np.asarray(positions)
    if pos.dtype.kind not in "fiu":
        raise TypeError(f"positions must be a real numeric array (got dtype {pos.dtype})")
    pos = pos.astype(np.float64)
    if units == "metres":
        if grid is None:
            raise ValueError("positions in metres need the object grid's pixel size: pass pixel_size_m (and "
                             "object_centre_m, object_shape) or grid=ObjectGrid(...)")
        pos = grid.to_pixels(pos)
    return to_default_centre(pos, N, convention)
