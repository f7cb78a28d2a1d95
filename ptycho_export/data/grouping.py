"""Gather a scan into neighbour groups for gridsize > 1 (``make_groups``).

The neighbour search itself lives in ``ptycho_runtime.grouping`` so training
and the runtime group identically.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ptycho_runtime.reconstruction.grouping import group_neighbors

from .container import GroupedData, PtychoData

__all__ = ["group_neighbors", "make_groups"]


def make_groups(
    data: PtychoData, gridsize: int, seed: int = 0, n_groups: Optional[int] = None
) -> GroupedData:
    """Gather ``data`` into neighbour groups (see ``group_neighbors``).

    Offsets are each member's (x, y) minus its group's centroid, computed in
    float64 and stored float32 [B, C, 1, 2]; for gridsize 1 they are zero.
    """
    idx = group_neighbors(data.xcoords, data.ycoords, gridsize, seed=seed, n_groups=n_groups)
    positions = np.stack([data.xcoords[idx], data.ycoords[idx]], axis=-1)
    offsets = positions - positions.mean(axis=1, keepdims=True)
    return GroupedData(
        diffraction=data.diffraction[idx],
        offsets=offsets[:, :, None, :].astype(np.float32),
        positions=positions,
        indices=idx,
        patches=None if data.patches is None else data.patches[idx],
    )
