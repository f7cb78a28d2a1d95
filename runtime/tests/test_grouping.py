"""cover_groups / count_groups: the network's groups for a refinement's start cover every frame, with fewer groups."""

from __future__ import annotations

import numpy as np
import pytest

from ptycho_runtime.reconstruction.grouping import count_groups, cover_groups, group_neighbors


def _spiral(n: int = 400) -> np.ndarray:
    k = np.arange(n)
    r, t = 3.0 * np.sqrt(k), k * np.pi * (3 - np.sqrt(5))
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


@pytest.mark.parametrize("gridsize", [2, 3])
def test_a_cover_holds_every_frame_with_far_fewer_groups(gridsize):
    pos = _spiral()
    idx = group_neighbors(pos[:, 0], pos[:, 1], gridsize)
    keep = cover_groups(idx, len(pos))
    assert np.array_equal(np.unique(idx[keep]), np.arange(len(pos)))  # every frame is predicted at least once
    C = gridsize**2
    assert len(pos) / C <= keep.size < 0.6 * len(pos)  # a third or less of the groups at C = 4 (measured 0.34)
    assert np.all(np.diff(keep) > 0)  # rows in order, as reconstruct predicts them
    np.testing.assert_array_equal(keep, cover_groups(idx, len(pos)))  # deterministic
    assert count_groups(pos[:, 0], pos[:, 1], gridsize, "cover") == keep.size
    assert count_groups(pos[:, 0], pos[:, 1], gridsize, "all") == len(pos)


def test_gridsize_one_keeps_every_frame():
    pos = _spiral(50)
    idx = group_neighbors(pos[:, 0], pos[:, 1], 1)
    np.testing.assert_array_equal(cover_groups(idx, 50), np.arange(50))
    assert count_groups(pos[:, 0], pos[:, 1], 1, "cover") == 50


def test_groups_that_cannot_cover_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="1 of the 4 frames are in no group"):
        cover_groups(np.array([[0, 1], [1, 2]]), 4)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        cover_groups(np.array([[0, 3]]), 3)
    with pytest.raises(ValueError, match="integer array"):
        cover_groups(np.array([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="groups must be one of all, cover"):
        count_groups(np.zeros(3), np.arange(3.0), 1, "some")
