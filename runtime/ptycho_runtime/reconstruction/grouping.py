"""Group scan positions into sets of C = gridsize² nearest neighbours (numpy only).

Lives in the runtime so training (ptycho_export.data.make_groups) and
inference group scans identically.

With gridsize > 1 the model reconstructs C overlapping patches jointly and
the overlap constraint ties them together, so each group must hold positions
that really overlap: the anchor and its C-1 nearest neighbours.  Groups are
built for every anchor (or a reproducible random subset of anchors), with
exact, deterministic tie-breaking (equal distances → lower index first), which
matters on raster scans where four neighbours are equidistant.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

# Distance rows computed at once: chunk * n float64 values (~2 MB, cache-friendly).
_DIST_CHUNK_ELEMENTS = 1 << 18


def checked_coordinates(xcoords: np.ndarray, ycoords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat float64 x and y of equal length, all finite; ValueError otherwise."""
    x = np.asarray(xcoords, dtype=np.float64).reshape(-1)
    y = np.asarray(ycoords, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"xcoords {x.shape} and ycoords {y.shape} differ in length")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("positions contain NaN or infinite values")
    return x, y


def _anchors(n: int, seed: int, n_groups: Optional[int]) -> np.ndarray:
    """All anchors in order, or ``n_groups`` of them drawn without replacement (sorted)."""
    if n_groups is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(n_groups, bool) or int(n_groups) != n_groups or n_groups < 1:
        raise ValueError(f"n_groups must be a positive integer or None (got {n_groups!r})")
    if n_groups > n:
        raise ValueError(f"n_groups={n_groups} exceeds the number of positions n={n}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(n_groups), replace=False)).astype(np.int64)


def _nearest(points: np.ndarray, anchors: np.ndarray, C: int) -> np.ndarray:
    """C nearest positions of each anchor, anchor first, then by (distance, index)."""
    n = points.shape[0]
    out = np.empty((anchors.size, C), dtype=np.int64)
    chunk = max(1, _DIST_CHUNK_ELEMENTS // n)
    for s in range(0, anchors.size, chunk):
        a = anchors[s : s + chunk]
        dx = points[a, 0][:, None] - points[None, :, 0]
        dy = points[a, 1][:, None] - points[None, :, 1]
        d2 = dx * dx + dy * dy
        d2[np.arange(a.size), a] = -1.0  # the anchor itself always comes first
        if C < n:
            part = np.argpartition(d2, C - 1, axis=1)[:, :C]
        else:
            part = np.broadcast_to(np.arange(n), (a.size, n)).copy()
        dsel = np.take_along_axis(d2, part, axis=1)
        order = np.lexsort((part, dsel), axis=-1)
        best = np.take_along_axis(part, order, axis=1)
        # argpartition picks arbitrarily among ties at the C-th distance;
        # redo those rows with a stable full sort so ties go to lower indices.
        kth = dsel.max(axis=1)
        tied = np.count_nonzero(d2 <= kth[:, None], axis=1) > C
        if np.any(tied):
            best[tied] = np.argsort(d2[tied], axis=1, kind="stable")[:, :C]
        out[s : s + chunk] = best
    return out


def group_neighbors(
    xcoords: np.ndarray,
    ycoords: np.ndarray,
    gridsize: int,
    seed: int = 0,
    n_groups: Optional[int] = None,
) -> np.ndarray:
    """Indices of neighbour groups, int64 [B, C] with C = gridsize².

    gridsize 1: every position is its own group (B = n, in order).
    gridsize > 1: for each anchor, the anchor followed by its C-1 nearest
    positions by Euclidean distance (ties → lower index).
    ``n_groups`` keeps a random subset of anchors (``default_rng(seed)``,
    returned in increasing anchor order); None keeps all n.

    Raises:
        ValueError: gridsize < 1, C > n, mismatched or non-finite coordinates.
    """
    x, y = checked_coordinates(xcoords, ycoords)
    if isinstance(gridsize, bool) or int(gridsize) != gridsize or gridsize < 1:
        raise ValueError(f"gridsize must be an integer >= 1 (got {gridsize!r})")
    n = x.size
    C = int(gridsize) ** 2
    if C > n:
        raise ValueError(f"gridsize={gridsize} needs C={C} positions per group but only n={n} exist")
    anchors = _anchors(n, seed, n_groups)
    if C == 1:
        return anchors[:, None].copy()
    return _nearest(np.stack([x, y], axis=1), anchors, C)


GROUPINGS = ("all", "cover")
"""Which groups a reconstruction predicts: every anchor's ("all") or a cover of the frames (``cover_groups``)."""


def cover_groups(groups: np.ndarray, n: int) -> np.ndarray:
    """Rows of ``groups`` [B, C] that together hold each of the ``n`` frames at least once, greedily few.

    Why: with gridsize > 1 every frame anchors a group, so each frame is
    predicted C times on average. A refinement only needs a start on every
    frame's window, and predicting a cover (about a third of the groups at
    C = 4 on a spiral) cuts the network's pass by as much at no measured cost
    to the refined object (docs/fidelity.md, "Fewer network groups").

    Greedy and deterministic: groups whose C frames are all still uncovered
    are taken first (in row order), then those adding C − 1 new frames, and
    so on; a group is only taken while its anchor (column 0) is uncovered.
    Every frame anchors a group when ``groups`` has all n anchors, so the
    last pass covers whatever is left. Returns the kept row indices, sorted.

    Raises:
        ValueError: ``groups`` is not [B, C] of indices below ``n``, or some
            frame is in no group (a cover of all n frames is impossible).
    """
    g = np.asarray(groups)
    if g.ndim != 2 or g.shape[1] < 1 or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"groups must be an integer array [B, C] (got {g.dtype} {g.shape})")
    if g.size and (g.min() < 0 or g.max() >= n):
        raise ValueError(f"group indices must lie in [0, {n}) (got {g.min()}..{g.max()})")
    if np.unique(g).size != n:
        raise ValueError(f"{n - np.unique(g).size} of the {n} frames are in no group, so no cover of them exists")
    covered = np.zeros(n, dtype=bool)
    keep = np.zeros(g.shape[0], dtype=bool)
    for need in range(g.shape[1], 0, -1):
        for row in np.flatnonzero(~keep & ~covered[g[:, 0]]):  # anchors still uncovered, in row order
            members = g[row]
            if not covered[members[0]] and np.count_nonzero(~covered[members]) >= need:
                keep[row] = True
                covered[members] = True
    return np.flatnonzero(keep)


def count_groups(xcoords: np.ndarray, ycoords: np.ndarray, gridsize: int, groups: str = "all") -> int:
    """How many groups a scan of these positions is predicted as under the ``groups`` rule (for progress totals)."""
    x, _ = checked_coordinates(xcoords, ycoords)
    if groups not in GROUPINGS:
        raise ValueError(f"groups must be one of {', '.join(GROUPINGS)} (got {groups!r})")
    if groups == "all" or gridsize == 1:
        return int(x.size)
    return int(cover_groups(group_neighbors(xcoords, ycoords, gridsize), x.size).size)
