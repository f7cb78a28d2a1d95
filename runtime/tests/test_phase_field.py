"""The smooth phase field fitted to the frames (ptycho_runtime.refinement.phase_field) and its place in refine_scan."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ptycho_runtime.inference.scan_refinement import RefineSettings, refine_scan
from ptycho_runtime.reconstruction.stitching import StitchCanvas, probe_window
from ptycho_runtime.refinement.phase_field import DEFAULT_EVERY, SPACING, PhaseField

N = 32


def _probe() -> np.ndarray:
    y, x = np.mgrid[:N, :N] - (N - 1) / 2
    r2 = (x**2 + y**2) / (N / 5) ** 2
    return (np.exp(-r2) * np.exp(0.8j * r2)).astype(np.complex64)


def _object(size: int = 160, seed: int = 0) -> np.ndarray:
    """A textured object (a few px features), so every frame's far field has structure to shift."""
    rng = np.random.default_rng(seed)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    texture = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * np.exp(-(f / 0.1) ** 2)))
    texture /= np.abs(texture).max()
    return ((0.8 + 0.15 * texture) * np.exp(1j * 0.8 * texture)).astype(np.complex64)


def _slow_phase(shape: tuple[int, int]) -> np.ndarray:
    """A smooth phase error ±0.6 rad varying over ~3 probe widths: what the sweeps leave longest."""
    rows, cols = np.indices(shape) / shape[0]
    return (0.6 * np.sin(2 * np.pi * 0.8 * rows + 0.5) * np.cos(2 * np.pi * 0.6 * cols)).astype(np.float64)


def _read(obj: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The N×N patch with pixel (0, 0) at ``start`` (column, row), read bilinearly (the engine's read)."""
    c, r = start
    c0, r0, fx, fy = int(c), int(r), c - int(c), r - int(r)
    s = obj[r0:r0 + N + 1, c0:c0 + N + 1]
    return ((1 - fy) * (1 - fx) * s[:-1, :-1] + (1 - fy) * fx * s[:-1, 1:]
            + fy * (1 - fx) * s[1:, :-1] + fy * fx * s[1:, 1:])


@pytest.fixture(scope="module")
def scan():
    obj, probe = _object(), _probe()
    grid = [(c, r) for r in range(4, obj.shape[0] - N - 4, 6) for c in range(4, obj.shape[1] - N - 4, 6)]
    starts = np.array(grid, dtype=np.float64) + np.random.default_rng(1).uniform(0, 1, (len(grid), 2))
    amps = [np.abs(np.fft.fftshift(np.fft.fft2(probe * _read(obj, s)))) / N for s in starts]
    canvas = StitchCanvas(obj.shape, N, window=probe_window(probe))
    positions = starts + (N - 1) / 2
    canvas.add(np.ones((len(starts), N, N), np.complex64), positions)
    lit = canvas.result().weight > 0.2 * canvas.result().weight.max()
    return obj, probe, np.array(amps, np.float32), starts, positions, canvas.result(), lit


def _phase_error(a: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """RMS phase difference on ``mask`` after the best constant phase (which no pattern sees)."""
    d = np.angle(a[mask] * np.conj(truth[mask]))
    d = np.angle(np.exp(1j * (d - np.angle(np.mean(np.exp(1j * d))))))
    return float(np.sqrt(np.mean(d**2)))


def test_each_frames_slope_of_a_plane_is_the_plane_and_the_adjoint_is_exact(scan):
    obj, probe, amp, starts, *_ = scan
    field = PhaseField(obj.shape, probe, starts)
    rows, cols = np.indices(field.nodes) * float(SPACING)
    for plane, expected in ((rows, (1.0, 0.0)), (cols, (0.0, 1.0)), (0.3 * rows - 0.7 * cols, (0.3, -0.7))):
        np.testing.assert_allclose(field.slopes(plane.reshape(-1)), np.broadcast_to(expected, (len(field.frames), 2)),
                                   atol=1e-9)
    rng = np.random.default_rng(0)
    c, v = rng.standard_normal(field.nodes[0] * field.nodes[1]), rng.standard_normal((len(field.frames), 2))
    assert np.vdot(field.slopes(c), v) == pytest.approx(np.vdot(c, field.slopes_adjoint(v)), rel=1e-10)
    np.testing.assert_allclose(field.field(c)[::SPACING, ::SPACING], c.reshape(field.nodes)[:len(range(
        0, obj.shape[0], SPACING)), :len(range(0, obj.shape[1], SPACING))], atol=1e-12)


def test_the_local_ramps_are_the_misfits_derivatives(scan):
    """Gauss-Newton's gradient is the exact gradient of the misfit in each frame's ramp (finite differences)."""
    obj, probe, amp, starts, *_ = scan
    start = (obj * np.exp(1j * _slow_phase(obj.shape))).astype(np.complex64)
    field = PhaseField(obj.shape, probe, starts)
    g, H, f = field.local_ramps(start, amp[field.frames], probe)
    h = 1e-3
    u = np.arange(N) - (N - 1) / 2
    for j in (0, len(field.frames) // 2):
        wave = probe * _read(start, field.starts[j])
        measured = np.fft.ifftshift(amp[field.frames[j]])

        def misfit(kr: float, kc: float, wave: np.ndarray = wave, measured: np.ndarray = measured) -> float:
            ramp = np.exp(1j * (kr * u[:, None] + kc * u[None, :]))
            return float(np.sum((np.abs(np.fft.fft2(wave * ramp)) / N - measured) ** 2))

        assert f[j] == pytest.approx(misfit(0, 0), rel=1e-4)
        numeric = [(misfit(h, 0) - misfit(-h, 0)) / (2 * h), (misfit(0, h) - misfit(0, -h)) / (2 * h)]
        np.testing.assert_allclose(g[j], numeric, rtol=2e-2, atol=1e-3 * np.abs(numeric).max())
        assert np.all(np.linalg.eigvalsh(H[j]) > 0)


def test_a_fit_removes_most_of_a_slow_phase_error_and_lowers_the_misfit(scan):
    obj, probe, amp, starts, _, _, lit = scan
    start = (obj * np.exp(1j * _slow_phase(obj.shape))).astype(np.complex64)
    field = PhaseField(obj.shape, probe, starts)
    corrected, fits = start, []
    for _ in range(3):  # each fit is a Gauss-Newton step: three take it most of the way
        factor, fit = field.fit(corrected, amp[field.frames], probe)
        fits.append(fit)
        if factor is not None:
            corrected = corrected * factor
    assert fits[0].applied and fits[0].misfit_after < 0.7 * fits[0].misfit_before
    # every k-th frame, k set by their density (here ~4 per node the frames reach): a fraction, spread evenly
    assert fits[0].frames_used == len(field.frames) and 1 < len(starts) / len(field.frames) < 10
    np.testing.assert_array_equal(np.diff(field.frames), field.frames[1] - field.frames[0])
    assert _phase_error(corrected, obj, lit) < 0.35 * _phase_error(start, obj, lit)


def test_the_true_object_is_left_as_it_is(scan):
    obj, probe, amp, starts, _, _, lit = scan
    field = PhaseField(obj.shape, probe, starts)
    factor, fit = field.fit(obj, amp[field.frames], probe)
    assert factor is None or _phase_error(obj * factor, obj, lit) < 0.01
    assert fit.misfit_before < 1e-6 * float(np.sum(amp.astype(np.float64) ** 2))
    assert fit.record(4)["after_sweep"] == 4 and set(fit.record(4)) >= {"misfit_ratio", "applied", "peak_to_peak_rad"}


def test_refine_scan_fits_the_field_while_the_probe_is_fixed_and_records_it(scan):
    obj, probe, amp, _, positions, start, lit = scan
    assert RefineSettings().phase_field_every == DEFAULT_EVERY
    slow = replace(start, object=np.where(start.covered, obj * np.exp(1j * _slow_phase(obj.shape)), 1)
                   .astype(np.complex64))
    common = dict(sweeps=8, start="network", amplitude_prior="none", refine_probe=False, phase_ramp_every=0,
                  coarse_sweeps=0)  # the fits of one level (test_coarse_level.py: the coarse level's)
    runs = {every: refine_scan(slow, amp, positions, probe, RefineSettings(phase_field_every=every, **common),
                               probe_source="the test's probe") for every in (0, 2)}
    fits = runs[2].refinement["phase_field_fits"]
    assert [f["after_sweep"] for f in fits] == [2, 4, 6, 8] and fits[0]["applied"]
    assert runs[2].refinement["phase_field_every"] == 2 and runs[0].refinement["phase_field_fits"] == []
    assert runs[2].refinement["phase_field_spacing_px"] == SPACING
    assert _phase_error(runs[2].object, obj, lit) < 0.6 * _phase_error(runs[0].object, obj, lit)
    assert runs[2].refinement["phase_field_planes"]
    # with the probe refined the fits go on without their plane (the probe takes a ramp up); the slow phase is
    # still removed
    free = {every: refine_scan(slow, amp, positions, probe, RefineSettings(**{**common, "refine_probe": True},
                                                                           phase_field_every=every),
                               probe_source="the test's probe") for every in (0, 2)}
    assert len(free[2].refinement["phase_field_fits"]) == 4 and not free[2].refinement["phase_field_planes"]
    assert _phase_error(free[2].object, obj, lit) < 0.8 * _phase_error(free[0].object, obj, lit)
    with pytest.raises(ValueError, match="phase_field_every must be an integer >= 0"):
        RefineSettings(phase_field_every=-1)


def test_without_planes_a_fit_leaves_a_global_ramp_to_the_probe(scan):
    obj, probe, amp, starts, _, _, lit = scan
    rows, cols = np.indices(obj.shape)
    ramped = (obj * np.exp(1j * (0.01 * rows - 0.006 * cols))).astype(np.complex64)
    field = PhaseField(obj.shape, probe, starts)
    with_planes, _ = field.fit(ramped, amp[field.frames], probe)
    assert with_planes is not None and _phase_error(ramped * with_planes, obj, lit) < 0.3 * _phase_error(
        ramped, obj, lit)
    without, fit = field.fit(ramped, amp[field.frames], probe, planes=False)
    assert without is None or _phase_error(ramped * without, ramped, lit) < 0.05 * _phase_error(ramped, obj, lit)


def test_a_fit_given_every_frames_amplitude_says_to_pass_the_fits_own(scan):
    obj, probe, amp, starts, *_ = scan
    field = PhaseField(obj.shape, probe, starts)
    assert len(field.frames) < len(starts)
    with pytest.raises(ValueError, match=r"amplitude\[field.frames\]"):
        field.fit(obj, amp, probe)
