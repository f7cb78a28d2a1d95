"""Which frames are updated together: batches of mutually non-overlapping windows.

Sequential ePIE updates one frame at a time, so each frame sees its
neighbours' corrections: that is why it converges about twice as fast per
sweep as a parallel (all-at-once) update. Two frames whose read windows do
not overlap do not see each other at all, so updating them together is
exactly the sequential update in some order, and a batch of them is a few
array operations over [B, N, N] instead of B small ones. The object update of
such a batch is a plain fancy-index add: no two of its windows share a pixel.

A frame at sub-pixel origin (x, y) reads the (N+1)×(N+1) window with corner
(floor(y), floor(x)) (bilinear interpolation, as ``StitchCanvas`` splats), so
two frames conflict when their integer corners are closer than N+1 in both
axes. ``sparse_batches`` colours that conflict graph greedily, visiting the
frames in a seeded random order (pty-chi spreads its batches' points for the
same reason; its ``compact`` mode is the opposite, neighbours together).
"""

from __future__ import annotations

import numpy as np

BATCHINGS = ("sparse", "sequential", "parallel")


def window_corners(starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols) of each frame's (N+1)² window corner and its bilinear weights [n, 4] (w00, w01, w10, w11).

    ``starts`` [n, 2] are (column, row) canvas coordinates of frame pixel (0, 0).
    """
    low = np.floor(starts)
    f = (starts - low).astype(np.float32)
    fx, fy = f[:, 0], f[:, 1]
    weights = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], axis=1).astype(np.float32)
    return low[:, 1].astype(np.int64), low[:, 0].astype(np.int64), weights


def fractions(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fy, fx) [n] float32, contiguous: the row and column fractions whose products are the corner ``weights``
    (``window_corners``), as the compiled loops take them."""
    w = np.asarray(weights)
    return (np.ascontiguousarray(w[:, 2] + w[:, 3], dtype=np.float32),
            np.ascontiguousarray(w[:, 1] + w[:, 3], dtype=np.float32))


def sparse_batches(rows: np.ndarray, cols: np.ndarray, N: int, seed: int = 0,
                   max_batch: int | None = None) -> list[np.ndarray]:
    """Frame indices grouped so that no two (N+1)² windows in a group overlap (greedy colouring).

    ``max_batch`` caps a group's size (memory on large scans); groups come
    out largest first.
    """
    n = rows.shape[0]
    if n == 0:
        return []
    order = np.random.default_rng(seed).permutation(n)
    side = N + 1
    colour = np.full(n, -1, dtype=np.int64)
    sizes: list[int] = []
    for i in order:
        near = (np.abs(rows - rows[i]) < side) & (np.abs(cols - cols[i]) < side) & (colour >= 0)
        taken = np.zeros(len(sizes) + 1, dtype=bool)
        taken[colour[near]] = True
        if max_batch is not None:
            full = np.array([s >= max_batch for s in sizes] + [False])
            taken |= full
        c = int(np.argmin(taken))  # the first free colour (the last one is always free)
        if c == len(sizes):
            sizes.append(0)
        colour[i] = c
        sizes[c] += 1
    groups = [np.flatnonzero(colour == c) for c in range(len(sizes))]
    return sorted(groups, key=len, reverse=True)


def make_batches(batching: str, rows: np.ndarray, cols: np.ndarray, N: int, seed: int = 0,
                 max_batch: int | None = None) -> list[np.ndarray]:
    """The frame groups of one sweep for ``batching`` (see ``BATCHINGS``)."""
    n = rows.shape[0]
    if batching == "sparse":
        return sparse_batches(rows, cols, N, seed, max_batch)
    if batching == "sequential":
        return [np.array([i]) for i in np.random.default_rng(seed).permutation(n)]
    if batching == "parallel":
        size = n if max_batch is None else max_batch
        return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]
    raise ValueError(f"batching must be one of {', '.join(BATCHINGS)} (got {batching!r})")


def windows_overlap(rows: np.ndarray, cols: np.ndarray, N: int) -> bool:
    """True when any two of these (N+1)² windows share a pixel."""
    dr = np.abs(rows[:, None] - rows[None, :]) < N + 1
    dc = np.abs(cols[:, None] - cols[None, :]) < N + 1
    clash = dr & dc
    np.fill_diagonal(clash, False)
    return bool(clash.any())
