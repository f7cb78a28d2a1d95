"""ePIE refinement (ptycho_runtime.refinement): the physics it assumes, and that it moves towards the data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ptycho_runtime.reconstruction.stitching import StitchCanvas, probe_window
from ptycho_runtime.refinement import far_field_misfit, refine_epie

N = 32


def _probe() -> np.ndarray:
    y, x = np.mgrid[:N, :N] - (N - 1) / 2
    r2 = (x**2 + y**2) / (N / 5) ** 2
    return (np.exp(-r2) * np.exp(1j * 0.8 * r2)).astype(np.complex64)


def _object(size: int = 80, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spectrum = np.fft.fft2(rng.standard_normal((size, size)))
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    smooth = np.real(np.fft.ifft2(spectrum * np.exp(-(f / 0.08) ** 2)))
    smooth /= np.abs(smooth).max()
    return ((0.8 + 0.15 * smooth) * np.exp(1j * 0.9 * smooth)).astype(np.complex64)


def _scan(obj: np.ndarray, fractional: bool) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless amplitudes by the textbook model: patch[r, c] = obj[y − (N−1)/2 + r, x − (N−1)/2 + c]."""
    starts = [(c, r) for r in range(4, obj.shape[0] - N - 4, 5) for c in range(4, obj.shape[1] - N - 4, 5)]
    starts = np.array(starts, dtype=np.float64)
    if fractional:
        starts += np.random.default_rng(1).uniform(0, 1, starts.shape)
    amps = []
    for c, r in starts:
        c0, r0, fx, fy = int(c), int(r), c - int(c), r - int(r)
        s = obj[r0:r0 + N + 1, c0:c0 + N + 1]
        patch = ((1 - fy) * (1 - fx) * s[:-1, :-1] + (1 - fy) * fx * s[:-1, 1:]
                 + fy * (1 - fx) * s[1:, :-1] + fy * fx * s[1:, 1:])
        amps.append(np.abs(np.fft.fftshift(np.fft.fft2(_probe() * patch))) / N)
    return np.array(amps, np.float32), starts + (N - 1) / 2  # positions name frame pixel (N−1)/2


def _flat_start(obj: np.ndarray, positions: np.ndarray):
    canvas = StitchCanvas(obj.shape, N, window=probe_window(_probe()))
    canvas.add(np.ones((len(positions), N, N), np.complex64), positions)
    return canvas.result()


def _error(recon_obj: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Relative error after removing the global phase (which no ptychographic data determines)."""
    a, b = recon_obj[mask], truth[mask]
    c = np.vdot(a, b)
    return float(np.linalg.norm(a * c / abs(c) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("fractional", [False, True])
def test_the_true_object_fits_the_data_and_is_left_in_place(fractional):
    obj = _object()
    amp, pos = _scan(obj, fractional)
    start = _flat_start(obj, pos)
    truth_start = type(start)(obj.copy(), start.weight, start.x_coords, start.y_coords)
    starts = pos - (N - 1) / 2
    assert far_field_misfit(obj, amp, _probe(), starts) < 1e-10  # same frame convention as the data
    assert far_field_misfit(obj, amp, _probe(), starts + 0.5) > 1e-5  # which a half-pixel slip would break
    kept = refine_epie(truth_start, amp, pos, _probe(), iterations=2)
    lit = start.weight > 0.2 * start.weight.max()
    assert _error(kept.object, obj, lit) < 2e-3  # float32 round-off only


def test_iterations_move_a_flat_start_towards_the_data_and_the_object():
    obj = _object(seed=3)
    amp, pos = _scan(obj, fractional=True)
    start = _flat_start(obj, pos)
    starts = pos - (N - 1) / 2
    lit = start.weight > 0.2 * start.weight.max()
    seen = []
    current = start
    for _ in range(3):
        current = refine_epie(current, amp, pos, _probe(), iterations=5)
        seen.append((far_field_misfit(np.where(current.covered, current.object, 1), amp, _probe(), starts),
                     _error(current.object, obj, lit)))
    flat_misfit = far_field_misfit(np.ones_like(obj), amp, _probe(), starts)
    assert seen[0][0] < 0.5 * flat_misfit
    assert seen[2][0] < seen[1][0] < seen[0][0]
    assert seen[2][1] < seen[0][1] < _error(np.ones_like(obj), obj, lit)
    assert seen[2][1] < 0.1


def test_result_keeps_the_grid_and_reports_progress():
    obj = _object()
    amp, pos = _scan(obj, fractional=False)
    start = dataclasses.replace(_flat_start(obj, pos), pixel_size_m=(1e-8, 1e-8), centre_m=(2e-6, -1e-6))
    calls = []
    out = refine_epie(start, amp, pos, _probe(), iterations=3, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert out.object.shape == start.object.shape and out.object.dtype == np.complex64
    np.testing.assert_array_equal(out.weight, start.weight)
    np.testing.assert_array_equal(out.x_coords, start.x_coords)
    assert out.pixel_size_m == (1e-8, 1e-8) and out.centre_m == (2e-6, -1e-6)
    same = refine_epie(start, amp, pos, _probe(), iterations=0)
    np.testing.assert_array_equal(same.object[start.covered], start.object[start.covered])
    assert np.all(same.object[~start.covered] == 1)  # uncovered pixels start as free space


def test_bad_inputs_are_refused_with_the_reason():
    obj = _object()
    amp, pos = _scan(obj, fractional=False)
    start = _flat_start(obj, pos)
    with pytest.raises(ValueError, match="amplitude must be"):
        refine_epie(start, amp[:, :-1], pos, _probe())
    with pytest.raises(ValueError, match="positions must be"):
        refine_epie(start, amp, pos[:-1], _probe())
    with pytest.raises(ValueError, match="iterations"):
        refine_epie(start, amp, pos, _probe(), iterations=-1)
    with pytest.raises(ValueError, match="step"):
        refine_epie(start, amp, pos, _probe(), step=0)
    far = pos.copy()
    far[0] = (500.0, 500.0)
    with pytest.raises(ValueError, match="outside"):
        refine_epie(start, amp, far, _probe())


def test_momentum_converges_faster_than_plain_epie():
    obj = _object(seed=5)
    amp, pos = _scan(obj, fractional=True)
    start = _flat_start(obj, pos)
    lit = start.weight > 0.2 * start.weight.max()
    plain = refine_epie(start, amp, pos, _probe(), iterations=8, momentum=0.0)
    fast = refine_epie(start, amp, pos, _probe(), iterations=8)
    assert _error(fast.object, obj, lit) < 0.8 * _error(plain.object, obj, lit)
    with pytest.raises(ValueError, match="momentum"):
        refine_epie(start, amp, pos, _probe(), momentum=1.0)
