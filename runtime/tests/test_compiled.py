"""numba's compiled loops (reconstruction.compiled) and where they run: the numba backend, the stitching's splat,
the exit waves and misfits of the fits and checks. Each agrees with its numpy reference; without numba (or with a
broken one) the numpy code runs. Skipped where numba is not installed (the torch-free venv runs numpy there)."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest

from ptycho_runtime.reconstruction import compiled, stitching
from ptycho_runtime.reconstruction.stitching import StitchCanvas, probe_window
from ptycho_runtime.refinement import Refiner, engine, exit_waves, far_field_misfit, phase_field

numba = pytest.importorskip("numba")

N = 32


def _probe(defocus: float = 0.8) -> np.ndarray:
    y, x = np.mgrid[:N, :N] - (N - 1) / 2
    r2 = (x**2 + y**2) / (N / 5) ** 2
    return (np.exp(-r2) * np.exp(1j * defocus * r2)).astype(np.complex64)


def _object(size: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    smooth = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * np.exp(-(f / 0.08) ** 2)))
    smooth /= np.abs(smooth).max()
    return ((0.8 + 0.15 * smooth) * np.exp(1j * 0.9 * smooth)).astype(np.complex64)


@pytest.fixture(scope="module")
def scan():
    """Noiseless amplitudes of a smooth object at fractional positions, and a flat start on the object's grid."""
    obj, P = _object(), _probe()
    starts = np.array([(c, r) for r in range(3, 96 - N - 3, 4) for c in range(3, 96 - N - 3, 4)], np.float64)
    starts += np.random.default_rng(1).uniform(0, 1, starts.shape)
    rows, cols, weights = exit_waves.window_corners(starts)
    waves = np.stack([P * _read(obj, s) for s in starts])
    amp = (np.abs(np.fft.fftshift(np.fft.fft2(waves), axes=(-2, -1))) / N).astype(np.float32)
    canvas = StitchCanvas(obj.shape, N, window=probe_window(P))
    canvas.add(np.ones((len(starts), N, N), np.complex64), starts + (N - 1) / 2)
    return {"object": obj, "probe": P, "starts": starts, "positions": starts + (N - 1) / 2, "amplitude": amp,
            "start": canvas.result(), "corners": (rows, cols, weights)}


def _read(obj: np.ndarray, start: np.ndarray) -> np.ndarray:
    c, r = int(np.floor(start[0])), int(np.floor(start[1]))
    fx, fy = start[0] - c, start[1] - r
    s = obj[r:r + N + 1, c:c + N + 1]
    return ((1 - fy) * (1 - fx) * s[:-1, :-1] + (1 - fy) * fx * s[:-1, 1:] + fy * (1 - fx) * s[1:, :-1]
            + fy * fx * s[1:, 1:])


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("fft", ["compiled", "scipy"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("refine_probe", [False, True])
def test_the_numba_backend_agrees_with_numpy_after_20_sweeps_on_both_paths(scan, fft, threads, refine_probe,
                                                                           monkeypatch):
    kernels = compiled.load_kernels()
    if fft == "compiled" and kernels.batch_step is None:
        pytest.skip("rocket-fft is not installed (or numba's threads are its workqueue): no compiled FFT here")
    P = _probe(defocus=0.5) if refine_probe else scan["probe"]  # a wrong probe gives the probe step work to do
    ref = Refiner(scan["start"], P, backend="numpy", refine_probe=refine_probe)
    ref = ref.add_frames(scan["amplitude"], scan["positions"]).run(20)
    if fft == "scipy":
        monkeypatch.setattr(kernels, "batch_step", None)
    refiner = Refiner(scan["start"], P, backend="numba", refine_probe=refine_probe,
                      backend_options={"threads": threads})
    assert refiner._backend.compiled_fft is (fft == "compiled")
    out = refiner.add_frames(scan["amplitude"], scan["positions"]).run(20)
    assert _relative(out.reconstruction.object, ref.reconstruction.object) < 1e-4
    assert _relative(out.probe, ref.probe) < 1e-4
    np.testing.assert_allclose(out.record["misfit"], ref.record["misfit"], rtol=1e-3)
    assert out.record["backend"] == "numba" and ref.record["misfit"][-1] < 0.2 * ref.record["misfit"][0]


def test_auto_takes_numba_on_the_cpu_and_numpy_where_numba_is_absent(scan, monkeypatch):
    def backend_of(**kwargs):
        return Refiner(scan["start"], scan["probe"], **kwargs).add_frames(scan["amplitude"], scan["positions"]).run(
            1).record["backend"]

    assert backend_of() == "numba" and engine.prepare_backend() == "numba"
    monkeypatch.setattr(compiled, "numba_available", lambda: False)  # what a runtime without numba sees
    assert backend_of() == "numpy" and engine.prepare_backend() == "numpy"
    with pytest.raises(ValueError, match="numba backend runs on the CPU only"):
        backend_of(backend="numba", device="cuda")


def test_a_numba_that_fails_to_load_leaves_auto_on_numpy_with_a_warning(scan, monkeypatch, caplog):
    def broken():
        raise RuntimeError("LLVM could not compile the kernels")

    monkeypatch.setattr(compiled, "load_kernels", broken)
    monkeypatch.setattr("ptycho_runtime.refinement.numba_backend.load_kernels", broken)
    with caplog.at_level(logging.WARNING, logger="ptycho_runtime.refinement.engine"):
        out = Refiner(scan["start"], scan["probe"]).add_frames(scan["amplitude"], scan["positions"]).run(1)
    assert out.record["backend"] == "numpy"
    assert "did not load (RuntimeError: LLVM could not compile" in caplog.text
    assert compiled.available_kernels() is None  # the stitching and the fits read with numpy then


def test_the_stitching_splat_gives_the_numpy_object_and_weights(scan, monkeypatch):
    rng = np.random.default_rng(4)
    positions = np.concatenate([scan["positions"], [[N / 2 + 0.5, 40.0], [95 - N / 2, 95 - N / 2 + 0.25]]])
    patches = (rng.standard_normal((len(positions), N, N)) + 1j * rng.standard_normal((len(positions), N, N)))
    patches = patches.astype(np.complex64)

    def stitch():
        canvas = StitchCanvas((96, 96), N, window=probe_window(scan["probe"]))
        canvas.add(patches, positions)
        return canvas.result()

    fast = stitch()
    monkeypatch.setattr(stitching, "available_kernels", lambda: None)
    slow = stitch()
    assert np.abs(fast.weight - slow.weight).max() <= 1e-12 * slow.weight.max()
    np.testing.assert_allclose(fast.object, slow.object, rtol=0, atol=1e-5 * np.abs(slow.object).max())


def test_batched_misfits_are_far_field_misfit_and_exit_waves_the_reads(scan, monkeypatch):
    obj, P, starts, amp = scan["object"] * np.complex64(1.05), scan["probe"], scan["starts"], scan["amplitude"]
    reference = far_field_misfit(obj, amp, P, starts) * len(starts) * N * N
    rows, cols, weights = scan["corners"]
    fast = exit_waves.exit_waves(obj, P, rows, cols, weights)
    assert exit_waves.frame_misfits(obj, amp, P, starts).sum() == pytest.approx(reference, rel=1e-4)
    monkeypatch.setattr(exit_waves, "available_kernels", lambda: None)
    assert exit_waves.frame_misfits(obj, amp, P, starts).sum() == pytest.approx(reference, rel=1e-4)
    np.testing.assert_allclose(fast, exit_waves.exit_waves(obj, P, rows, cols, weights), atol=1e-6)
    np.testing.assert_allclose(fast[3], P * _read(obj, starts[3]), atol=1e-5)
    picked = exit_waves.frame_misfits(obj, amp, P, starts, frames=np.array([2, 5]))
    np.testing.assert_allclose(picked, exit_waves.frame_misfits(obj, amp, P, starts)[[2, 5]])


@pytest.mark.parametrize("fft", ["compiled", "scipy"])
def test_the_local_ramps_sums_compiled_are_numpys(scan, fft, monkeypatch):
    kernels = compiled.load_kernels()
    if fft == "compiled" and kernels.ramp_step is None:
        pytest.skip("rocket-fft is not installed: no compiled FFT here")
    if fft == "scipy":
        monkeypatch.setattr(kernels, "ramp_step", None)  # the sums compiled, the FFTs scipy's
    obj = scan["object"] * np.exp(0.02j * np.indices(scan["object"].shape)[1]).astype(np.complex64)
    field = phase_field.PhaseField(obj.shape, scan["probe"], scan["starts"])
    amp = scan["amplitude"][field.frames]
    fast = field.local_ramps(obj, amp, scan["probe"])
    monkeypatch.setattr(phase_field, "available_kernels", lambda: None)
    slow = field.local_ramps(obj, amp, scan["probe"])
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
    assert np.all(fast[2] > 0) and np.any(np.abs(fast[0]) > 0)  # a ramp the data see: the sums are not zero


def test_refiners_of_one_scan_share_its_frames_and_batches(scan):
    first = Refiner(scan["start"], scan["probe"]).add_frames(scan["amplitude"], scan["positions"])
    other = Refiner(replace(scan["start"], object=np.ones_like(scan["start"].object)), scan["probe"])
    other.add_frames_of(first)
    assert other.n_frames == first.n_frames and other.batches() is first.batches()
    assert other._measured_all is first._measured_all  # held once
    a, b = first.run(3), Refiner(scan["start"], scan["probe"]).add_frames(scan["amplitude"], scan["positions"]).run(3)
    np.testing.assert_array_equal(a.reconstruction.object, b.reconstruction.object)
    moving = other.run(3).record["misfit"]  # refines its own object against the shared frames
    assert moving[-1] < 0.5 * moving[0]
    with pytest.raises(ValueError, match="holds no frames yet"):
        other.add_frames_of(first)
    moved = replace(scan["start"], x_coords=scan["start"].x_coords + 1)
    with pytest.raises(ValueError, match="same grid"):
        Refiner(moved, scan["probe"]).add_frames_of(first)


def test_a_forked_child_refines_with_the_serial_loops(scan):
    """GNU OpenMP's threads do not survive fork(): a child of a process that ran the parallel loops uses the
    serial ones (scipy's FFTs between them) and gets the same object."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork() here")
    parent = Refiner(scan["start"], scan["probe"]).add_frames(scan["amplitude"], scan["positions"]).run(5)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        compiled_fft, obj = pool.apply(_refine_in_child, (scan["start"], scan["probe"], scan["amplitude"],
                                                          scan["positions"]))
    assert compiled_fft is False
    assert _relative(obj, parent.reconstruction.object) < 1e-4


def _refine_in_child(start, probe, amplitude, positions):
    refiner = Refiner(start, probe).add_frames(amplitude, positions)
    return refiner._backend.compiled_fft, refiner.run(5).reconstruction.object


def test_two_threads_refining_at_once_get_the_objects_of_one_at_a_time(scan):
    """A host may refine two scans in two threads (the stream refines beside its stitching): numba's parallel
    loops run under a thread-safe layer (OpenMP), or not at all (``compiled._warm``)."""
    import threading

    def run(out, key):
        out[key] = Refiner(scan["start"], scan["probe"]).add_frames(scan["amplitude"], scan["positions"]).run(8)

    alone: dict = {}
    run(alone, "a")
    together: dict = {}
    threads = [threading.Thread(target=run, args=(together, k)) for k in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(together) == {"a", "b"}
    for key in "ab":
        np.testing.assert_array_equal(together[key].reconstruction.object, alone["a"].reconstruction.object)
