"""The coarse level of a refinement (ptycho_runtime.refinement.coarse_level) and its place in refine_scan."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ptycho_runtime.inference.refine_start import TRIAL_SWEEPS, coarse_sweeps
from ptycho_runtime.inference.scan_refinement import DEFAULT_COARSE_SWEEPS, RefineSettings, refine_scan
from ptycho_runtime.reconstruction.stitching import StitchCanvas, probe_window
from ptycho_runtime.refinement import far_field_misfit
from ptycho_runtime.refinement.coarse_level import FACTOR, CoarseScan, decimate, upsample, usable

N = 32


def _probe(defocus: float = 0.8) -> np.ndarray:
    y, x = np.mgrid[:N, :N] - (N - 1) / 2
    r2 = (x**2 + y**2) / (N / 5) ** 2
    return (np.exp(-r2) * np.exp(1j * defocus * r2)).astype(np.complex64)


def _object(size: int = 96, seed: int = 0, width: float = 0.08) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    smooth = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * np.exp(-(f / width) ** 2)))
    smooth /= np.abs(smooth).max()
    return ((0.8 + 0.15 * smooth) * np.exp(1j * 1.2 * smooth)).astype(np.complex64)


def _read(obj: np.ndarray, start: np.ndarray, n: int) -> np.ndarray:
    c, r = start
    c0, r0, fx, fy = int(c), int(r), c - int(c), r - int(r)
    s = obj[r0:r0 + n + 1, c0:c0 + n + 1]
    return ((1 - fy) * (1 - fx) * s[:-1, :-1] + (1 - fy) * fx * s[:-1, 1:]
            + fy * (1 - fx) * s[1:, :-1] + fy * fx * s[1:, 1:])


def _scan(obj: np.ndarray, probe: np.ndarray, step: int = 5):
    grid = [(c, r) for r in range(4, obj.shape[0] - N - 4, step) for c in range(4, obj.shape[1] - N - 4, step)]
    starts = np.array(grid, dtype=np.float64) + np.random.default_rng(1).uniform(0, 1, (len(grid), 2))
    amps = np.array([np.abs(np.fft.fftshift(np.fft.fft2(probe * _read(obj, s, N)))) / N for s in starts],
                    np.float32)
    canvas = StitchCanvas(obj.shape, N, window=probe_window(probe))
    positions = starts + (N - 1) / 2
    canvas.add(np.ones((len(starts), N, N), np.complex64), positions)
    return amps, starts, positions, canvas.result()


@pytest.fixture(scope="module")
def smooth_scan():
    obj, probe = _object(width=0.04), _probe()  # features of ~8 px: within the coarse band
    return (obj, probe, *_scan(obj, probe))


def _relative_misfit(obj, amp, probe, starts) -> float:
    return far_field_misfit(obj, amp, probe, starts) / float(np.mean(amp.astype(np.float64) ** 2))


def test_the_coarse_frames_are_what_the_coarse_object_and_probe_explain(smooth_scan):
    """Each frame's central band is the far field of the band-limited probe on the decimated object.

    Exactly for a flat object (the probe alone), closely for one smooth on the coarse grid; against the same
    frames, a probe made without the n/N units or frames read at the full grid's origins fit far worse.
    """
    obj, probe, amp, starts, _, start = smooth_scan
    level = CoarseScan(start, amp, starts, probe)
    n = N // FACTOR
    assert level.amplitude.shape == (len(starts), n, n) and level.probe.shape == (n, n)
    flat = np.ones(level.shape, np.complex64)
    free, _, _, _ = _scan(np.ones(obj.shape, np.complex64), probe)
    assert _relative_misfit(flat, CoarseScan(start, free, starts, probe).amplitude, level.probe,
                            level.starts) < 1e-10
    coarse = decimate(obj, FACTOR, level.shape)
    fit = _relative_misfit(coarse, level.amplitude, level.probe, level.starts)
    assert fit < 2e-3
    assert _relative_misfit(coarse, level.amplitude, level.probe * (N / n), level.starts) > 100 * fit
    assert _relative_misfit(coarse, level.amplitude, level.probe, level.starts + 3) > 10 * fit  # misplaced


def test_a_smooth_canvas_survives_decimation_and_interpolation_and_a_zero_correction_changes_nothing():
    obj = _object(width=0.03)
    level_shape = (obj.shape[0] // 2 + 2, obj.shape[1] // 2 + 2)
    back = upsample(decimate(obj, 2, level_shape), 2, obj.shape)
    inner = (slice(2, -2), slice(2, -2))
    assert np.linalg.norm(back[inner] - obj[inner]) < 0.02 * np.linalg.norm(obj[inner])
    coarse = decimate(obj, 2, level_shape)
    amp, starts, _, start = _scan(obj, _probe())
    lifted = CoarseScan(start, amp, starts, _probe()).lift(obj, coarse, coarse)
    np.testing.assert_array_equal(lifted, obj)


def test_which_refinements_run_a_coarse_level():
    assert RefineSettings().coarse_sweeps == DEFAULT_COARSE_SWEEPS == 4
    assert coarse_sweeps(RefineSettings(), 64) == 4  # 2 trial, 4 coarse, 10 full
    assert coarse_sweeps(RefineSettings(coarse_sweeps=10), 64) == 7  # as many full after it
    assert coarse_sweeps(RefineSettings(sweeps=8), 64) == (8 - TRIAL_SWEEPS) // 2 == 3  # as many full after
    assert coarse_sweeps(RefineSettings(sweeps=3), 64) == 0
    assert coarse_sweeps(RefineSettings(coarse_sweeps=0), 64) == 0
    assert coarse_sweeps(RefineSettings(refine_probe=True), 64) == 4  # the coarse probe is lifted back too
    assert usable(32) and usable(128) and not usable(24) and not usable(30)
    assert coarse_sweeps(RefineSettings(), 24) == 0
    with pytest.raises(ValueError, match="coarse_sweeps must be an integer >= 0"):
        RefineSettings(coarse_sweeps=-1)


def test_a_coarse_level_does_what_its_sweeps_would_at_full_resolution_and_is_recorded(smooth_scan):
    """6 coarse sweeps before the full ones leave the object closer to the truth than the full ones alone.

    And the record says what ran: the levels' sweeps and misfits apart, the fits at the whole refinement's
    sweeps, progress counting every sweep once, in order.
    """
    obj, probe, amp, _, positions, start = smooth_scan
    lit = start.weight > 0.2 * start.weight.max()
    seen: list[tuple[int, int]] = []
    common = dict(start="flat", refine_probe=False, amplitude_prior="none", phase_field_every=4)
    with_level = refine_scan(start, amp, positions, probe, RefineSettings(
        sweeps=16, coarse_sweeps=6, progress=lambda d, t: seen.append((d, t)), **common),
        probe_source="the test's probe")
    full_only = refine_scan(start, amp, positions, probe, RefineSettings(sweeps=10, coarse_sweeps=0, **common),
                            probe_source="the test's probe")

    def error(o: np.ndarray) -> float:
        a, b = o[lit], obj[lit]
        c = np.vdot(a, b) / np.vdot(a, a)
        return float(np.linalg.norm(a * c - b) / np.linalg.norm(b))

    assert error(with_level.object) < 0.8 * error(full_only.object)  # the same 10 full sweeps, and the level
    record = with_level.refinement
    assert record["coarse_sweeps"] == 6 and record["coarse_factor"] == FACTOR and record["sweeps"] == 16
    assert len(record["misfit_per_sweep"]) == 10 and len(record["coarse_misfit_per_sweep"]) == 6
    assert record["coarse_misfit_per_sweep"][-1] < record["coarse_misfit_per_sweep"][0]
    assert record["misfit_per_sweep"][-1] < record["misfit_per_sweep"][TRIAL_SWEEPS - 1]  # the full sweeps gain
    assert [f["after_sweep"] for f in record["coarse_phase_field_fits"]] == [4, 8]
    assert [f["after_sweep"] for f in record["phase_field_fits"]] == [12, 16]
    assert seen == [(k, 16) for k in range(1, 17)]
    assert full_only.refinement["coarse_sweeps"] == 0 and full_only.refinement["coarse_factor"] is None
    forced = refine_scan(replace(start, object=np.where(start.covered, obj, 1).astype(np.complex64)), amp,
                         positions, probe, RefineSettings(sweeps=16, coarse_sweeps=6,
                                                          **{**common, "start": "network"}),
                         probe_source="the test's probe")
    assert error(forced.object) < 0.05  # started at the truth, the level and the lift keep it there


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_every_backend_runs_the_coarse_level_as_the_numpy_reference_does(smooth_scan, backend):
    pytest.importorskip("onnxruntime" if backend == "onnx" else "torch")
    obj, probe, amp, _, positions, start = smooth_scan
    settings = RefineSettings(sweeps=8, coarse_sweeps=3, start="flat", refine_probe=False, amplitude_prior="none")
    runs = {name: refine_scan(start, amp, positions, probe, replace(settings, backend=name),
                              probe_source="the test's probe") for name in ("numpy", backend)}
    assert runs[backend].refinement["coarse_sweeps"] == 3 and runs[backend].refinement["backend"] == backend
    lit = start.weight > 0
    a, b = runs[backend].object[lit], runs["numpy"].object[lit]
    assert np.linalg.norm(a - b) < 1e-4 * np.linalg.norm(b)


def test_a_refinement_cancelled_on_the_coarse_level_hands_on_its_object_on_the_full_grid(smooth_scan):
    from ptycho_runtime.refinement import RefinementCancelled

    _, probe, amp, _, positions, start = smooth_scan
    sweeps_seen = []
    settings = RefineSettings(sweeps=16, start="flat", refine_probe=False,
                              progress=lambda done, total: sweeps_seen.append(done))
    with pytest.raises(RefinementCancelled) as caught:  # cancelled once the 2 trial sweeps and 1 coarse one ran
        refine_scan(start, amp, positions, probe, settings, probe_source="the test's probe",
                    cancel=lambda: len(sweeps_seen) >= TRIAL_SWEEPS + 1)
    partial = caught.value.partial
    assert partial.reconstruction.object.shape == start.object.shape and partial.record["coarse_level"]
    assert partial.record["cancelled"] and np.all(np.isfinite(partial.reconstruction.object))
    np.testing.assert_array_equal(partial.reconstruction.x_coords, start.x_coords)


def test_the_lifted_probe_takes_the_coarse_probes_band_and_keeps_its_own_outside_it(smooth_scan):
    _, probe, amp, starts, _, start = smooth_scan
    level = CoarseScan(start, amp, starts, probe)
    rng = np.random.default_rng(4)
    refined = (level.probe * (1 + 0.2 * rng.standard_normal(level.probe.shape))).astype(np.complex64)
    lifted = level.lift_probe(probe, level.probe, refined)
    np.testing.assert_allclose(CoarseScan(start, amp, starts, lifted).probe, refined, atol=1e-5)
    n, c0 = N // FACTOR, N // 2 - N // FACTOR // 2
    outer = np.ones((N, N), bool)
    outer[c0:c0 + n, c0:c0 + n] = False
    spectra = [np.fft.fftshift(np.fft.fft2(p)) for p in (lifted, probe)]
    np.testing.assert_allclose(spectra[0][outer], spectra[1][outer], atol=1e-4 * np.abs(spectra[1]).max())
    np.testing.assert_allclose(level.lift_probe(probe, level.probe, level.probe), probe, atol=1e-6)


def test_with_the_probe_refined_the_coarse_level_refines_it_too_and_the_record_says_so(smooth_scan):
    _, probe, amp, _, positions, start = smooth_scan
    wrong = _probe(defocus=0.5)
    common = dict(sweeps=16, start="flat", refine_probe=True, amplitude_prior="none", max_sweeps=0)
    run = refine_scan(start, amp, positions, wrong, RefineSettings(coarse_sweeps=4, **common),
                      probe_source="the test's probe")
    record = run.refinement
    assert record["coarse_sweeps"] == 4 and record["probe_updated"]
    assert record["coarse_misfit_per_sweep"][-1] < record["coarse_misfit_per_sweep"][0]

    def probe_error(p: np.ndarray) -> float:
        return float(np.linalg.norm(p * (np.vdot(p, probe) / np.vdot(p, p)) - probe) / np.linalg.norm(probe))

    assert probe_error(run.probe) < 0.4 * probe_error(wrong)  # 0.048 against the guess's 0.148
