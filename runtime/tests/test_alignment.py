"""Phase alignment of overlapping patches: random constant phases per patch come out as one phase."""

import numpy as np
import pytest

from ptycho_runtime.reconstruction.alignment import align_patch_phases, stitch_scan
from ptycho_runtime.reconstruction.stitching import probe_window, stitch_patches

N = 16


def _scene(seed=0, n_side=9, step=4.0):
    rng = np.random.default_rng(seed)
    size = int(n_side * step + N + 4)
    yy, xx = np.mgrid[:size, :size]
    obj = (0.8 + 0.2 * np.sin(xx / 3.0)) * np.exp(1j * (np.cos(yy / 4.0) + 0.5 * np.sin(xx / 5.0)))
    c = (N - 1) / 2 + 2
    pos = np.array([(c + i * step, c + j * step) for j in range(n_side) for i in range(n_side)])
    starts = (pos - (N - 1) / 2).astype(int)
    patches = np.stack([obj[y:y + N, x:x + N] for x, y in starts]).astype(np.complex64)
    return obj, pos, patches, rng


def test_random_patch_phases_are_undone_up_to_one_global_phase():
    obj, pos, patches, rng = _scene()
    offsets = rng.uniform(-1.0, 1.0, len(patches))  # a network's guesses scatter (0.44 rad measured), not uniformly
    scrambled = patches * np.exp(1j * offsets)[:, None, None].astype(np.complex64)
    factors = align_patch_phases(scrambled, pos, iterations=40)
    residual = np.angle(np.exp(1j * offsets) * factors)  # should be one constant for every patch
    residual = np.angle(np.exp(1j * (residual - residual[0])))
    assert np.abs(residual).max() < 0.05
    # stitched, the scrambled patches wash out; aligned they give the object back (up to a global phase)
    raw = stitch_patches(scrambled, pos, object_shape=obj.shape, crop=N)
    aligned = stitch_scan(scrambled, pos, crop=N, align_phase=40, object_shape=obj.shape)
    cov = aligned.covered
    g = np.exp(1j * np.angle(np.sum(obj[cov] * np.conj(aligned.object[cov]))))
    assert np.abs(aligned.object[cov] * g - obj[cov]).max() < 0.05
    assert np.abs(raw.object[cov]).mean() < 0.9 * np.abs(obj[cov]).mean()  # an incoherent average shrinks


def test_consistent_patches_are_left_alone_and_inputs_checked():
    obj, pos, patches, _ = _scene(n_side=5)
    factors = align_patch_phases(patches, pos, iterations=10)
    assert np.allclose(factors / factors[0], 1.0, atol=1e-3)
    assert np.all(align_patch_phases(patches, pos, iterations=0) == 1)
    with pytest.raises(ValueError, match="bin_factor"):
        align_patch_phases(patches, pos, bin_factor=3)
    with pytest.raises(ValueError, match="must match"):
        align_patch_phases(patches, pos[:-1])


def test_probe_window_drops_the_faint_tails():
    probe = np.zeros((N, N), complex)
    probe[4:12, 4:12] = 1.0
    probe[0, 0] = 1e-2  # 1e-4 of the peak intensity
    w = probe_window(probe)
    assert w[0, 0] == 0 and w[5, 5] == 1.0 and np.count_nonzero(w) == 64
