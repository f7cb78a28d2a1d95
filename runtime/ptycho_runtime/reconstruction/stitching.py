"""Stitch object patches into the full object: vectorised, weighted, incremental.

Convention (``geometry.py``, shared with ``ptycho_export.data``): a scan
position (x, y) in object pixels is the patch centre, frame pixel (N−1)/2 as
in PtychoPINN and ptychodus: ``patch[r, c]`` sits at object pixel
``(y − (N−1)/2 + r, x − (N−1)/2 + c)``. Fractional positions are splatted bilinearly
(the adjoint of bilinear sampling), so sub-pixel scans stitch without a
half-pixel bias.

Weighting: by default only the central ``N/2 × N/2`` crop of each patch is
used (where the probe is bright and PtychoPINN's decoder puts its central
path), each pixel with weight 1; pass ``window`` (an [N, N] array, e.g. the
probe intensity |P|²) for a smooth weighting instead. The object is
Σ w·patch / Σ w; pixels no patch reached have weight 0 and the value
``fill`` (0 by default; ptychodus expects 1+0j, free space).

Out-of-grid patches (``out_of_grid``): a patch that lies partly outside a
fixed canvas is "clip"ped (its inside pixels are used; the default) or
"drop"ped; a patch wholly outside is always dropped. Both are counted
(``n_clipped``, ``n_dropped``) and never stop a reconstruction; "raise"
restores the strict check.

The canvas accumulates in float64, so adding patches in any order or in
any batch split gives the same object to ~1e-12: the streaming path and the
batch path agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .compiled import available_kernels
from .geometry import frame_origin
from .real_view import real_view

# A canvas larger than this many pixels is refused (an outlier position or a unit mistake: x = 1e9 once asked
# for 678 GiB). 2**26 px = 8192 × 8192, 1.5 GiB of float64 accumulators; callers may pass a larger max_pixels.
MAX_CANVAS_PIXELS = 2**26


@dataclass
class Reconstruction:
    """A stitched object and the pixel grid it lives on.

    ``x_coords``/``y_coords`` are the object-pixel coordinates of the columns
    and rows of ``object`` (the scan positions' frame). ``weight`` is the sum
    of stitching weights per pixel (0 = not covered). When the positions were
    placed on an object grid with a pixel size (``ObjectGrid``),
    ``pixel_size_m`` (x, y) and ``centre_m`` — the metres of the array centre,
    pixel ((W−1)/2, (H−1)/2) as in ptychodus — say where the object is;
    otherwise they are None. ``n_clipped`` patches lay partly outside the
    grid (their inside pixels were used) and ``n_dropped`` were not used at all.
    After refinement against the scan (``inference.scan_refinement``),
    ``probe`` is the probe the object goes with (refined or the scan's) and
    ``refinement`` the record of what ran; both are None for a network-only stitch.
    """

    object: np.ndarray
    weight: np.ndarray
    x_coords: np.ndarray
    y_coords: np.ndarray
    pixel_size_m: Optional[tuple[float, float]] = None
    centre_m: Optional[tuple[float, float]] = None
    n_clipped: int = 0
    n_dropped: int = 0
    probe: Optional[np.ndarray] = None
    refinement: Optional[dict[str, Any]] = None

    @property
    def amplitude(self) -> np.ndarray:
        return np.abs(self.object)

    @property
    def phase(self) -> np.ndarray:
        return np.angle(self.object)

    @property
    def covered(self) -> np.ndarray:
        return self.weight > 0


def canvas_bounds(positions: np.ndarray, N: int, margin: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """Origin (x0, y0) and shape (H, W) of a canvas that holds every patch at these positions."""
    start = frame_origin(np.asarray(positions, dtype=np.float64).reshape(-1, 2), N)
    lo = np.floor(start.min(axis=0)) - margin
    hi = np.ceil(start.max(axis=0) + N - 1) + margin
    x0, y0 = int(lo[0]), int(lo[1])
    return (x0, y0), (int(hi[1]) - y0 + 1, int(hi[0]) - x0 + 1)


def _window(N: int, crop: Optional[int], window: Optional[np.ndarray]) -> np.ndarray:
    if window is not None:
        w = np.asarray(window, dtype=np.float64)
        if w.shape != (N, N):
            raise ValueError(f"window must have shape ({N}, {N}) to match the patches (got {w.shape})")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("window must be finite and non-negative")
        return w
    crop = N // 2 if crop is None else int(crop)
    if not (0 < crop <= N):
        raise ValueError(f"crop must be in 1..{N} (got {crop})")
    w = np.zeros((N, N))
    lo = (N - crop) // 2
    w[lo : lo + crop, lo : lo + crop] = 1.0
    return w


OUT_OF_GRID = ("clip", "drop", "raise")
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))
_CHUNK = 128  # patches spread at once by the slice-add path (≈ 9 MB per complex128 array at N = 64)


def bilinear_spread(values: np.ndarray, fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """Bilinear splat of [n, h, w] values shifted by (fy, fx) ∈ [0, 1)² ([n, 1, 1]) onto [n, h+1, w+1].

    The adjoint of a bilinear read, shared by the stitching here and the
    refinement's numpy backend. Separably (rows, then columns: the corner
    weights are products (1−fy|fy)·(1−fx|fx)), which takes fewer passes than
    four shifted adds, and on the real view of complex values (``real_view``;
    a column is ``e`` floats). The result has the dtype of ``values`` and the
    factors together (complex64 stays complex64 with float32 factors).
    """
    n, h, w = values.shape
    dtype = np.result_type(values, fy, fx)
    v, _ = real_view(np.ascontiguousarray(values) if np.iscomplexobj(values) else values)
    rows = np.empty((n, h + 1, w), dtype=dtype)
    r, _ = real_view(rows)
    np.multiply(v, 1 - fy, out=r[:, :-1])
    r[:, -1] = 0
    r[:, 1:] += v * fy
    out = np.empty((n, h + 1, w + 1), dtype=dtype)
    o, e = real_view(out)
    np.multiply(r, 1 - fx, out=o[:, :, :-e])
    o[:, :, -e:] = 0
    o[:, :, e:] += r * fx
    return out


class StitchCanvas:
    """An object canvas that patches are added to as they arrive.

    ``origin`` (x0, y0) is the object-pixel coordinate of canvas pixel (0, 0).
    Adding is vectorised over a chunk of patches and their pixels, then one
    slice add per patch (a scatter, np.bincount, for patches partly off the
    canvas); only the window's bounding box is touched. ``out_of_grid`` and ``fill``:
    see the module docstring.
    """

    def __init__(self, shape: tuple[int, int], N: int, origin: tuple[int, int] = (0, 0),
                 crop: Optional[int] = None, window: Optional[np.ndarray] = None, out_of_grid: str = "clip",
                 fill: complex = 0.0, max_pixels: int = MAX_CANVAS_PIXELS) -> None:
        if out_of_grid not in OUT_OF_GRID:
            raise ValueError(f"out_of_grid must be one of {', '.join(map(repr, OUT_OF_GRID))} (got {out_of_grid!r})")
        self.shape = (int(shape[0]), int(shape[1]))
        if self.shape[0] < 1 or self.shape[1] < 1:
            raise ValueError(f"canvas shape must be positive (got {self.shape})")
        if self.shape[0] * self.shape[1] > max_pixels:
            raise ValueError(
                f"a {self.shape[0]}×{self.shape[1]} canvas holds more than {max_pixels} pixels (the cap): scan "
                "positions far apart (an outlier, or a wrong unit such as nanometres) ask for this. Crop the scan to "
                "the region you need, or raise max_pixels / max_canvas_pixels")
        self.N = int(N)
        self.origin = (int(origin[0]), int(origin[1]))
        self.out_of_grid = out_of_grid
        self.fill = complex(fill)
        w = _window(self.N, crop, window)
        rows, cols = np.nonzero(w)
        self._rows, self._cols = rows, cols
        self._w = w[rows, cols]
        size = self.shape[0] * self.shape[1]
        self._re = np.zeros(size)
        self._im = np.zeros(size)
        self._wsum = np.zeros(size)
        self.n_patches = 0
        self.n_clipped = 0
        self.n_dropped = 0

    @classmethod
    def for_positions(cls, positions: np.ndarray, N: int, **kwargs) -> "StitchCanvas":
        origin, shape = canvas_bounds(positions, N)
        return cls(shape, N, origin, **kwargs)

    def _locate(self, pos: np.ndarray) -> tuple[np.ndarray, ...]:
        """Canvas coordinates of patch pixel (0, 0) (integer, fraction) and which patches lie partly/wholly outside.

        A patch's footprint is its window's bounding box, one pixel wider where
        the bilinear splat has a fractional part.
        """
        H, W = self.shape
        start = frame_origin(pos, self.N)
        cx = start[:, 0] - self.origin[0]
        cy = start[:, 1] - self.origin[1]
        ix, iy = np.floor(cx), np.floor(cy)
        fx, fy = cx - ix, cy - iy
        ix, iy = ix.astype(np.int64), iy.astype(np.int64)
        r_lo, r_hi = iy + self._rows.min(), iy + self._rows.max() + (fy > 0)
        c_lo, c_hi = ix + self._cols.min(), ix + self._cols.max() + (fx > 0)
        partial = (r_lo < 0) | (c_lo < 0) | (r_hi >= H) | (c_hi >= W)
        outside = (r_hi < 0) | (c_hi < 0) | (r_lo >= H) | (c_lo >= W)
        if self.out_of_grid == "raise" and partial.any():
            raise ValueError(
                f"{int(partial.sum())} patch(es) fall outside the {H}×{W} canvas (origin {self.origin}); "
                "give an object grid that covers every scan position ± N/2, let the canvas be sized from the "
                "positions, or use out_of_grid='clip' or 'drop'")
        return ix, iy, fx, fy, partial, outside

    def check_inside(self, positions: np.ndarray) -> None:
        """Validate positions [n, 2] (x, y) before they are queued: finite, and inside with out_of_grid='raise'."""
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        if not np.all(np.isfinite(pos)):
            raise ValueError("positions contain NaN or inf")
        if pos.shape[0]:
            self._locate(pos)

    def _corners(self, ix: np.ndarray, iy: np.ndarray, fx: np.ndarray, fy: np.ndarray, clip: bool):
        """Per bilinear corner: flat canvas indices [n, K] and weights [n, K] (0 where a pixel is off the canvas)."""
        H, W = self.shape
        for dy, dx in _CORNERS:
            wgt = (fy if dy else 1 - fy) * (fx if dx else 1 - fx)
            if not np.any(wgt):
                continue
            r = iy[:, None] + self._rows[None, :] + dy
            c = ix[:, None] + self._cols[None, :] + dx
            w = wgt[:, None] * self._w[None, :]
            if clip:
                inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
                w = np.where(inside, w, 0.0)
                r, c = np.where(inside, r, 0), np.where(inside, c, 0)
            yield r * W + c, w

    def add(self, patches: np.ndarray, positions: np.ndarray) -> None:
        """Add patches [n, N, N] (complex) at positions [n, 2] (x, y); out-of-grid ones per ``out_of_grid``."""
        patches = np.asarray(patches)
        pos = np.asarray(positions, dtype=np.float64)
        if patches.ndim != 3 or patches.shape[1:] != (self.N, self.N):
            raise ValueError(f"patches must have shape [n, {self.N}, {self.N}] (got {list(patches.shape)})")
        if pos.shape != (patches.shape[0], 2):
            raise ValueError(f"positions must have shape [{patches.shape[0]}, 2] as (x, y) to match the patches "
                             f"(got {list(pos.shape)})")
        if not np.all(np.isfinite(pos)):
            raise ValueError("positions contain NaN or inf")
        if patches.shape[0] == 0:
            return
        ix, iy, fx, fy, partial, outside = self._locate(pos)
        keep = ~(outside | partial) if self.out_of_grid == "drop" else ~outside
        self.n_dropped += int((~keep).sum())
        self.n_clipped += int((partial & keep).sum())
        self.n_patches += int(keep.sum())
        if not keep.all():
            patches, ix, iy, fx, fy, partial = patches[keep], ix[keep], iy[keep], fx[keep], fy[keep], partial[keep]
        inside = ~partial
        if inside.any():
            self._add_inside(patches[inside], ix[inside], iy[inside], fx[inside], fy[inside])
        if partial.any():
            self._add_clipped(patches[partial], ix[partial], iy[partial], fx[partial], fy[partial])

    def _add_inside(self, patches: np.ndarray, ix: np.ndarray, iy: np.ndarray, fx: np.ndarray,
                    fy: np.ndarray) -> None:
        """Patches whose footprint lies wholly on the canvas: each splat is one slice add per accumulator.

        The window's bounding box times the patch is spread bilinearly onto a
        box one pixel larger (separably, rows then columns), a few array
        passes per chunk of ``_CHUNK`` patches; then a loop of slice adds,
        several times faster than the scatter (``np.bincount``) that clipped
        patches need.
        """
        r0, c0 = int(self._rows.min()), int(self._cols.min())
        h, w = int(self._rows.max()) - r0 + 1, int(self._cols.max()) - c0 + 1
        window = np.zeros((h, w))
        window[self._rows - r0, self._cols - c0] = self._w
        re, im, wsum = (a.reshape(self.shape) for a in (self._re, self._im, self._wsum))
        H, W = self.shape
        kernels = available_kernels()
        if kernels is not None and patches.dtype == np.complex64:  # the same splat in one compiled loop
            box = np.ascontiguousarray(patches[:, r0:r0 + h, c0:c0 + w]).view(np.float32)
            kernels.splat(re, im, wsum, box, window, (iy + r0).astype(np.int64), (ix + c0).astype(np.int64),
                          np.asarray(fy, np.float64), np.asarray(fx, np.float64))
            return
        for k in range(0, patches.shape[0], _CHUNK):
            part = slice(k, k + _CHUNK)
            values = patches[part, r0:r0 + h, c0:c0 + w] * window  # complex128 [n, h, w]
            ty, tx = fy[part, None, None], fx[part, None, None]
            splat = (bilinear_spread(values, ty, tx), bilinear_spread(np.broadcast_to(window, values.shape), ty, tx))
            for j, (r, c) in enumerate(zip(iy[part] + r0, ix[part] + c0, strict=True)):
                # a whole-pixel offset (fy or fx = 0) may end at the canvas edge: its extra row/column is all 0
                dh, dw = min(h + 1, H - r), min(w + 1, W - c)
                box = (slice(r, r + dh), slice(c, c + dw))
                re[box] += splat[0][j, :dh, :dw].real
                im[box] += splat[0][j, :dh, :dw].imag
                wsum[box] += splat[1][j, :dh, :dw]

    def _add_clipped(self, patches: np.ndarray, ix: np.ndarray, iy: np.ndarray, fx: np.ndarray,
                     fy: np.ndarray) -> None:
        """Patches partly off the canvas: only their pixels on it are scattered (np.bincount)."""
        values = patches[:, self._rows, self._cols]  # [n, K]
        size = self.shape[0] * self.shape[1]
        for idx, w in self._corners(ix, iy, fx, fy, clip=True):
            idx = idx.ravel()
            self._re += np.bincount(idx, weights=(w * values.real).ravel(), minlength=size)
            self._im += np.bincount(idx, weights=(w * values.imag).ravel(), minlength=size)
            self._wsum += np.bincount(idx, weights=w.ravel(), minlength=size)

    def sample(self, positions: np.ndarray) -> np.ndarray:
        """The current object read back at each patch's window pixels: complex128 [n, K].

        Bilinear sampling, the adjoint of ``add``'s splat, so a patch that was
        added alone reads back as itself (pixels off the canvas read 0). ``K``
        pixels per patch are the window's non-zero pixels, in the order of
        ``window_values``.
        """
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        ix, iy, fx, fy, partial, _ = self._locate(pos)
        wsum = np.where(self._wsum > 1e-12, self._wsum, 1.0)
        obj = (self._re + 1j * self._im) / wsum
        out = np.zeros((pos.shape[0], self._rows.size), np.complex128)
        for idx, w in self._corners(ix, iy, fx, fy, clip=bool(partial.any())):
            out += w / self._w[None, :] * obj[idx]
        return out

    def window_values(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(patch values at the window's non-zero pixels [n, K], their weights [K])."""
        return np.asarray(patches)[:, self._rows, self._cols], self._w

    def result(self) -> Reconstruction:
        """The current object (a copy; safe to read while more patches arrive)."""
        wsum = self._wsum.reshape(self.shape)
        covered = wsum > 1e-12
        obj = np.full(self.shape, self.fill, np.complex64)
        safe = np.where(covered, wsum, 1.0)
        obj[covered] = ((self._re.reshape(self.shape) + 1j * self._im.reshape(self.shape)) / safe)[covered]
        x = self.origin[0] + np.arange(self.shape[1], dtype=np.float64)
        y = self.origin[1] + np.arange(self.shape[0], dtype=np.float64)
        return Reconstruction(obj, np.where(covered, wsum, 0.0), x, y, n_clipped=self.n_clipped,
                              n_dropped=self.n_dropped)

    def sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The float64 sums Σw·Re(patch), Σw·Im(patch) and Σw, as [H, W] copies.

        Stitching is a weighted sum, so canvases filled with disjoint sets of
        patches on one pixel grid add up (``add_sums``) to the canvas of all of
        them, exactly up to float64 summation order: how ``infer_many`` reduces
        the partial canvases of many workers.
        """
        return tuple(a.reshape(self.shape).copy() for a in (self._re, self._im, self._wsum))  # type: ignore

    def add_sums(self, origin: tuple[int, int], re: np.ndarray, im: np.ndarray, wsum: np.ndarray,
                 n_patches: int = 0) -> None:
        """Add another canvas's ``sums`` whose pixel (0, 0) is object pixel ``origin`` (x0, y0); it must fit."""
        h, w = np.shape(wsum)
        r0, c0 = int(origin[1]) - self.origin[1], int(origin[0]) - self.origin[0]
        if r0 < 0 or c0 < 0 or r0 + h > self.shape[0] or c0 + w > self.shape[1]:
            raise ValueError(f"a {h}×{w} partial canvas at origin {tuple(origin)} does not fit the {self.shape[0]}×"
                             f"{self.shape[1]} canvas at origin {self.origin}")
        for mine, theirs in ((self._re, re), (self._im, im), (self._wsum, wsum)):
            mine.reshape(self.shape)[r0:r0 + h, c0:c0 + w] += theirs
        self.n_patches += int(n_patches)


def probe_window(probe: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """Stitching weights |probe|², with pixels lit at under ``floor`` of the peak set to 0.

    |P|² trusts each patch where it was lit, which beats a central crop; the
    faint tails carry no usable signal, and skipping them makes stitching and
    phase alignment faster.
    """
    w = np.abs(np.asarray(probe)).astype(np.float64) ** 2
    return np.where(w >= floor * w.max(), w, 0.0)


def stitch_patches(patches: np.ndarray, positions: np.ndarray, *, object_shape: Optional[tuple[int, int]] = None,
                   crop: Optional[int] = None, window: Optional[np.ndarray] = None, out_of_grid: str = "clip",
                   fill: complex = 0.0, max_pixels: int = MAX_CANVAS_PIXELS) -> Reconstruction:
    """Stitch patches [n, N, N] (or [n, C, N, N]) at positions [n, 2] (or [n, C, 2]) in one call.

    With ``object_shape`` the canvas is the object frame itself (origin 0, 0;
    patches outside it per ``out_of_grid``); otherwise it is sized to the scan.
    A canvas above ``max_pixels`` is refused.
    """
    patches = np.asarray(patches)
    if patches.ndim < 3:
        raise ValueError(f"patches must have shape [n, N, N] or [n, C, N, N] (got {list(patches.shape)})")
    N = patches.shape[-1]
    flat_patches = patches.reshape(-1, *patches.shape[-2:])
    flat_pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if object_shape is None:
        canvas = StitchCanvas.for_positions(flat_pos, N, crop=crop, window=window, fill=fill, max_pixels=max_pixels)
    else:
        canvas = StitchCanvas(object_shape, N, (0, 0), crop=crop, window=window, out_of_grid=out_of_grid, fill=fill,
                              max_pixels=max_pixels)
    canvas.add(flat_patches, flat_pos)
    return canvas.result()
