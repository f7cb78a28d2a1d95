"""The frame-centre convention: (N−1)/2 by default, N/2 converted by half a pixel."""

import numpy as np
import pytest

from ptycho_runtime.reconstruction.geometry import frame_centre, frame_origin, to_default_centre
from ptycho_runtime.reconstruction.stitching import stitch_patches


def test_default_centre_is_geometric_array_centre():
    assert frame_centre(64) == 31.5 and frame_centre(64, "N/2") == 32.0
    np.testing.assert_allclose(frame_origin(np.array([31.5, 40.0]), 64), [0.0, 8.5])
    with pytest.raises(ValueError, match=r"\(N-1\)/2"):
        frame_centre(64, "centre")


def test_n_over_2_positions_convert_to_the_same_frames():
    N = 8
    obj = np.arange(20 * 20, dtype=np.complex64).reshape(20, 20)
    # A frame starting at object pixel (5, 6): position (9, 10) in the N/2 convention, (8.5, 9.5) by default.
    pos_n2 = np.array([[9.0, 10.0]])
    pos = to_default_centre(pos_n2, N, "N/2")
    np.testing.assert_allclose(pos, [[8.5, 9.5]])
    np.testing.assert_array_equal(to_default_centre(pos, N, "(N-1)/2"), pos)
    rec = stitch_patches(obj[None, 6:14, 5:13], pos, object_shape=obj.shape, crop=N)
    np.testing.assert_array_equal(rec.object[6:14, 5:13], obj[6:14, 5:13])
    assert rec.weight[6:14, 5:13].min() == 1.0 and rec.weight.sum() == N * N
