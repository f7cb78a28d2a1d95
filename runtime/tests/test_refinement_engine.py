"""The batched refinement engine (ptycho_runtime.refinement.refine / Refiner): its backends, batches and API."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ptycho_runtime.reconstruction.stitching import Reconstruction, StitchCanvas, probe_window
from ptycho_runtime.refinement import RefinementCancelled, Refiner, far_field_misfit, refine
from ptycho_runtime.refinement.batching import make_batches, sparse_batches, window_corners, windows_overlap

N = 32


def _probe(defocus: float = 0.8) -> np.ndarray:
    y, x = np.mgrid[:N, :N] - (N - 1) / 2
    r2 = (x**2 + y**2) / (N / 5) ** 2
    return (np.exp(-r2) * np.exp(1j * defocus * r2)).astype(np.complex64)


def _object(size: int = 80, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    smooth = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * np.exp(-(f / 0.08) ** 2)))
    smooth /= np.abs(smooth).max()
    return ((0.8 + 0.15 * smooth) * np.exp(1j * 0.9 * smooth)).astype(np.complex64)


def _scan(obj: np.ndarray, probe: np.ndarray, step: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless amplitudes at fractional positions: patch = bilinear read of obj at frame origin (x, y) − (N−1)/2."""
    grid = [(c, r) for r in range(4, obj.shape[0] - N - 4, step) for c in range(4, obj.shape[1] - N - 4, step)]
    starts = np.array(grid, dtype=np.float64)
    starts += np.random.default_rng(1).uniform(0, 1, starts.shape)
    amps = []
    for c, r in starts:
        c0, r0, fx, fy = int(c), int(r), c - int(c), r - int(r)
        s = obj[r0:r0 + N + 1, c0:c0 + N + 1]
        patch = ((1 - fy) * (1 - fx) * s[:-1, :-1] + (1 - fy) * fx * s[:-1, 1:]
                 + fy * (1 - fx) * s[1:, :-1] + fy * fx * s[1:, 1:])
        amps.append(np.abs(np.fft.fftshift(np.fft.fft2(probe * patch))) / N)
    return np.array(amps, np.float32), starts + (N - 1) / 2


def _flat_start(obj: np.ndarray, positions: np.ndarray) -> Reconstruction:
    canvas = StitchCanvas(obj.shape, N, window=probe_window(_probe()))
    canvas.add(np.ones((len(positions), N, N), np.complex64), positions)
    return canvas.result()


def _error(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Relative error after the best complex factor (global phase, and the object/probe scale trade-off)."""
    a, b = a[mask], b[mask]
    c = np.vdot(a, b) / np.vdot(a, a)
    return float(np.linalg.norm(a * c - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def problem():
    obj = _object(seed=3)
    amp, pos = _scan(obj, _probe())
    start = _flat_start(obj, pos)
    return obj, amp, pos, start, start.weight > 0.2 * start.weight.max()


def _backends() -> list:
    out = []
    for name in ("numba", "onnx", "torch"):
        try:
            __import__({"numba": "numba", "onnx": "onnxruntime"}.get(name, name))
            out.append(pytest.param(name))
        except ImportError:
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name} backend's library not installed")))
    return out


@pytest.mark.parametrize("refine_probe", [False, True])
@pytest.mark.parametrize("backend", _backends())
def test_every_backend_agrees_with_the_numpy_reference_after_20_sweeps(problem, backend, refine_probe):
    obj, amp, pos, start, lit = problem
    probe = _probe(defocus=0.6) if refine_probe else _probe()  # a wrong probe gives the probe update work to do
    ref = refine(start, amp, pos, probe, sweeps=20, backend="numpy", refine_probe=refine_probe)
    out = refine(start, amp, pos, probe, sweeps=20, backend=backend, refine_probe=refine_probe)
    a, b = ref.reconstruction.object, out.reconstruction.object
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 1e-4
    assert np.linalg.norm(out.probe - ref.probe) / np.linalg.norm(ref.probe) < 1e-4
    np.testing.assert_allclose(out.record["misfit"], ref.record["misfit"], rtol=1e-3)
    assert out.record["backend"] == backend and ref.record["backend"] == "numpy"
    assert _error(a, obj, lit) < 0.7 * _error(np.ones_like(obj), obj, lit)  # and they did move (not a no-op match)


@pytest.mark.parametrize("refine_probe", [False, True])
def test_the_numpy_backend_gives_the_same_object_with_numpys_fft_as_with_scipys(problem, refine_probe, monkeypatch):
    pytest.importorskip("scipy")
    from ptycho_runtime.refinement import numpy_backend

    obj, amp, pos, start, _ = problem
    probe = _probe(defocus=0.6) if refine_probe else _probe()
    assert numpy_backend.FFT.__name__ == "scipy.fft"  # where scipy is installed, the backend uses it
    with_scipy = refine(start, amp, pos, probe, sweeps=20, backend="numpy", refine_probe=refine_probe)
    monkeypatch.setattr(numpy_backend, "FFT", np.fft)  # what a runtime without scipy runs
    with_numpy = refine(start, amp, pos, probe, sweeps=20, backend="numpy", refine_probe=refine_probe)
    a, b = with_numpy.reconstruction.object, with_scipy.reconstruction.object
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 1e-4
    assert np.linalg.norm(with_scipy.probe - with_numpy.probe) / np.linalg.norm(with_numpy.probe) < 1e-4


def test_onnx_graph_with_the_canvas_in_the_graph_agrees_too(problem):
    pytest.importorskip("onnxruntime")
    obj, amp, pos, start, _ = problem
    ref = Refiner(start, _probe(), backend="numpy").add_frames(amp, pos).run(20)
    out = Refiner(start, _probe(), backend="onnx", backend_options={"canvas_in_graph": True})
    out = out.add_frames(amp, pos).run(20)
    a, b = ref.reconstruction.object, out.reconstruction.object
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 1e-4


@pytest.fixture(scope="module")
def wide_problem():
    """A scan wide enough for batches of up to a dozen frames (the small ``problem`` has at most three)."""
    obj = _object(size=160, seed=3)
    amp, pos = _scan(obj, _probe())
    return amp, pos, _flat_start(obj, pos)


_PART = {"numpy": ("numpy_backend", "NumpyBackend", "_part"), "onnx": ("onnx_backend", "OnnxBackend", "_run_part")}
"""Where each backend runs one part of a split batch (the part's measured frames are its third argument)."""


@pytest.mark.parametrize("backend", ["numpy", "onnx"])
@pytest.mark.parametrize("refine_probe", [False, True])
def test_batches_split_between_two_threads_agree_with_the_numpy_reference(wide_problem, backend, refine_probe,
                                                                           monkeypatch):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    module, cls, method = _PART[backend]
    cls = getattr(__import__(f"ptycho_runtime.refinement.{module}", fromlist=[cls]), cls)
    amp, pos, start = wide_problem
    probe = _probe(defocus=0.6) if refine_probe else _probe()
    ref = refine(start, amp, pos, probe, sweeps=20, backend="numpy", refine_probe=refine_probe)
    parts = []
    run_part = getattr(cls, method)
    monkeypatch.setattr(cls, method, lambda self, a, b, measured, *rest:
                        parts.append((threading.get_ident(), len(measured))) or run_part(self, a, b, measured, *rest))
    out = Refiner(start, probe, backend=backend, refine_probe=refine_probe, backend_options={"threads": 2})
    assert out._backend.threads == 2
    out = out.add_frames(amp, pos).run(20)
    assert len({ident for ident, _ in parts}) == 2  # the batches were shared between two threads
    assert sum(n for _, n in parts) == 20 * len(pos)  # every frame once per sweep, in one part or another
    a, b = ref.reconstruction.object, out.reconstruction.object
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 1e-4
    assert np.linalg.norm(out.probe - ref.probe) / np.linalg.norm(ref.probe) < 1e-4
    if refine_probe:
        assert np.linalg.norm(out.probe - probe) > 1e-3 * np.linalg.norm(probe)  # the probe step did run


@pytest.mark.parametrize("backend", ["numpy", "onnx"])
def test_a_forked_child_gets_its_own_helper_threads(wide_problem, backend):
    """The helper threads of a batch split do not survive fork(): a child that goes on with its parent's refiner
    makes new ones (rather than waiting forever on the parent's) and gets the parent's object."""
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork() here")
    amp, pos, start = wide_problem
    refiner = Refiner(start, _probe(), backend=backend, backend_options={"threads": 2}).add_frames(amp, pos)
    before = refiner.run(2).reconstruction.object  # the parent's helper thread exists now
    _FORKED["refiner"] = refiner  # a session does not pickle: the child finds the refiner in its copy of memory
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            child = pool.apply_async(_go_on_in_child).get(timeout=60)
    finally:
        _FORKED.clear()
    parent = refiner.run(3).reconstruction.object
    assert np.linalg.norm(child - before) > 0  # the child's sweeps ran
    assert np.linalg.norm(child - parent) / np.linalg.norm(parent) < 1e-6


_FORKED: dict = {}


def _go_on_in_child() -> np.ndarray:
    return _FORKED["refiner"].run(3).reconstruction.object


def test_the_onnx_step_graph_is_valid_onnx():
    onnx = pytest.importorskip("onnx")
    from ptycho_runtime.refinement.onnx_graph import build_step_graph

    for refine_probe in (False, True):
        for in_graph in (False, True):
            model = build_step_graph(16, refine_probe, in_graph)
            onnx.checker.check_model(model, full_check=True)
            assert {o.name for o in model.graph.output} >= {"misfit"}


def test_the_dft_graph_is_numpys_fft2_and_its_inverse_undoes_it():
    """The benchmark's floor (the step graph's two DFTs alone) must be the step's transforms, not a cheaper stand-in."""
    ort = pytest.importorskip("onnxruntime")
    from ptycho_runtime.refinement.onnx_backend import from_split, to_split
    from ptycho_runtime.refinement.onnx_graph import build_transform_graph

    N = 16
    model = build_transform_graph(N, with_spectrum=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((3, N, N)) + 1j * rng.standard_normal((3, N, N))).astype(np.complex64)
    roundtrip, spectrum = sess.run(None, {"frames": to_split(z)})
    np.testing.assert_allclose(from_split(spectrum), np.fft.fft2(z), rtol=0, atol=1e-4 * N * N)
    np.testing.assert_allclose(from_split(roundtrip), z, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batching", ["sparse", "sequential", "parallel"])
def test_the_true_object_is_a_fixed_point(problem, batching):
    obj, amp, pos, start, lit = problem
    truth = Reconstruction(obj.copy(), np.ones_like(start.weight), start.x_coords, start.y_coords)  # all covered
    kept = refine(truth, amp, pos, _probe(), sweeps=3, backend="numpy", batching=batching)
    assert _error(kept.reconstruction.object, obj, lit) < 2e-3  # float32 round-off only
    assert max(kept.record["misfit"]) < 1e-10


@pytest.mark.parametrize("batching", ["sparse", "parallel"])
def test_misfit_falls_and_the_object_approaches_the_truth(problem, batching):
    obj, amp, pos, start, lit = problem
    res = refine(start, amp, pos, _probe(), sweeps=15, backend="numpy", batching=batching,
                 alpha=1.0 if batching == "sparse" else 0.1)
    m = res.record["misfit"]
    assert m[-1] < 0.2 * m[0] and m[-1] < m[len(m) // 2]
    starts = pos - (N - 1) / 2
    assert far_field_misfit(res.reconstruction.object, amp, _probe(), starts) < m[0]
    assert _error(res.reconstruction.object, obj, lit) < 0.5 * _error(np.ones_like(obj), obj, lit)


def test_probe_refinement_recovers_a_perturbed_probe_better_than_a_fixed_one(problem):
    obj, amp, pos, start, lit = problem
    wrong = _probe(defocus=0.5)  # the data were measured with defocus 0.8
    fixed = refine(start, amp, pos, wrong, sweeps=20, backend="numpy")
    moved = refine(start, amp, pos, wrong, sweeps=20, backend="numpy", refine_probe=True)
    assert not fixed.record["probe_updated"] and moved.record["probe_updated"]
    np.testing.assert_array_equal(fixed.probe, wrong)
    true = _probe()
    assert _error(moved.probe, true, np.abs(true) > 0.1) < 0.7 * _error(wrong, true, np.abs(true) > 0.1)
    assert _error(moved.reconstruction.object, obj, lit) < 0.7 * _error(fixed.reconstruction.object, obj, lit)
    assert moved.record["misfit"][-1] < 0.01 * fixed.record["misfit"][-1]


def test_sparse_batches_never_overlap_and_cover_every_frame_once():
    rng = np.random.default_rng(0)
    starts = rng.uniform(0, 300, (400, 2))
    rows, cols, weights = window_corners(starts)
    np.testing.assert_allclose(weights.sum(axis=1), 1, rtol=1e-6)
    for n in (16, 64):
        groups = sparse_batches(rows, cols, n, seed=2)
        assert sorted(np.concatenate(groups).tolist()) == list(range(400))
        assert all(not windows_overlap(rows[g], cols[g], n) for g in groups)
        assert len(groups) < 400 and max(len(g) for g in groups) > 1  # batches, not one frame each
        capped = sparse_batches(rows, cols, n, seed=2, max_batch=3)
        assert max(len(g) for g in capped) <= 3 and not any(windows_overlap(rows[g], cols[g], n) for g in capped)
    # two windows N+1 apart in one axis do not overlap; N apart they do
    assert not windows_overlap(np.array([0, 0]), np.array([0, 33]), 32)
    assert windows_overlap(np.array([0, 0]), np.array([0, 32]), 32)
    with pytest.raises(ValueError, match="batching must be one of"):
        make_batches("compact", rows, cols, 16)


def test_progress_is_reported_per_sweep_and_cancel_stops_between_batches(problem):
    _, amp, pos, start, _ = problem
    calls = []
    res = refine(start, amp, pos, _probe(), sweeps=3, backend="numpy", progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert res.record["sweeps"] == 3 and not res.record["cancelled"]
    asked = []

    def cancel() -> bool:
        asked.append(1)
        return len(asked) > 5  # after five batches

    with pytest.raises(RefinementCancelled) as info:
        refine(start, amp, pos, _probe(), sweeps=3, backend="numpy", cancel=cancel)
    partial = info.value.partial
    assert partial.record["cancelled"] and partial.record["sweeps"] == 0
    assert partial.reconstruction.object.shape == start.object.shape
    assert not np.array_equal(partial.reconstruction.object, np.where(start.covered, start.object, 1))  # 5 batches ran
    stop = threading.Event()
    stop.set()
    with pytest.raises(RefinementCancelled):
        refine(start, amp, pos, _probe(), sweeps=1, backend="numpy", cancel=stop)


def test_the_result_keeps_the_grid_and_records_what_ran(problem):
    import dataclasses

    _, amp, pos, start, _ = problem
    start = dataclasses.replace(start, pixel_size_m=(1e-8, 1e-8), centre_m=(2e-6, -1e-6))
    res = refine(start, amp, pos, _probe(), sweeps=2, backend="numpy", momentum=0.5)
    rec = res.reconstruction
    assert rec.object.shape == start.object.shape and rec.object.dtype == np.complex64
    np.testing.assert_array_equal(rec.x_coords, start.x_coords)
    np.testing.assert_array_equal(rec.weight, start.weight)
    assert rec.pixel_size_m == (1e-8, 1e-8) and rec.centre_m == (2e-6, -1e-6)
    r = res.record
    assert (r["engine"], r["backend"], r["device"], r["batching"], r["momentum"]) == ("builtin", "numpy", "cpu",
                                                                                     "sparse", 0.5)
    assert r["batches"] > 1 and r["frames"] == len(pos) and len(r["misfit"]) == 2
    assert r["probe_updated"] is False and r["positions_refined"] is False and r["wall_s"] >= 0
    zero = refine(start, amp, pos, _probe(), sweeps=0, backend="numpy")
    np.testing.assert_array_equal(zero.reconstruction.object[start.covered], start.object[start.covered])


def test_a_refiner_takes_frames_as_they_come(problem):
    obj, amp, pos, start, lit = problem
    half = len(pos) // 2
    r = Refiner(start, _probe(), backend="numpy")
    r.add_frames(amp[:half], pos[:half])
    first = r.run(3)
    assert first.record["frames"] == half
    r.add_frames(amp[half:], pos[half:])
    second = r.run(10)
    assert second.record["frames"] == len(pos) and r.sweeps_run == 13 and second.record["sweeps_total"] == 13
    assert _error(second.reconstruction.object, obj, lit) < _error(first.reconstruction.object, obj, lit)


def test_a_newer_start_fills_only_pixels_no_frame_has_refined(problem):
    obj, amp, pos, start, _ = problem
    left = pos[:, 0] < np.median(pos[:, 0])
    r = Refiner(start, _probe(), backend="numpy")
    r.add_frames(amp[left], pos[left])
    before = r.run(2).reconstruction.object
    newer = Reconstruction(np.full_like(start.object, 0.5), start.weight, start.x_coords, start.y_coords)
    r.add_frames(amp[~left], pos[~left], start=newer)
    after = r.run(0).reconstruction.object
    touched = r._touched
    assert touched.any() and not touched.all()
    np.testing.assert_array_equal(after[touched], before[touched])  # refined pixels kept
    fill = ~touched & start.covered
    assert fill.any() and np.all(after[fill] == 0.5)  # the rest from the newer start
    other = Reconstruction(start.object[:-1], start.weight[:-1], start.x_coords, start.y_coords[:-1])
    with pytest.raises(ValueError, match="Refiner's grid"):
        r.add_frames(amp[:1], pos[:1], start=other)


def test_momentum_twice_per_sweep_converges_faster_than_once(problem):
    """The default applies the momentum after each half of a sweep (docs/fidelity.md): lower error, same sweeps."""
    from ptycho_runtime.refinement import Refiner

    obj, amp, pos, start, lit = problem
    errors = {}
    for steps in (1, 2):
        refiner = Refiner(start, _probe(), backend="numpy", momentum_steps=steps).add_frames(amp, pos)
        res = refiner.run(8)
        assert res.record["momentum_steps_per_sweep"] == steps
        errors[steps] = _error(res.reconstruction.object, obj, lit)
    assert Refiner(start, _probe()).momentum_steps == 2  # the default
    assert errors[2] < errors[1]
    with pytest.raises(ValueError, match="momentum_steps must be an integer >= 1"):
        Refiner(start, _probe(), momentum_steps=0)


def test_bad_inputs_are_refused_with_the_fix(problem):
    _, amp, pos, start, _ = problem
    P = _probe()
    cases = [
        (dict(amplitude=amp[:, :-1]), "amplitude must be"),
        (dict(positions=pos[:-1]), "positions must be"),
        (dict(amplitude=-amp), "amplitude must be finite and >= 0"),
        (dict(probe=P[:-1]), "probe must be a square"),
        (dict(probe=np.zeros_like(P)), "probe must be finite and not all zero"),
        (dict(sweeps=-1), "sweeps must be an integer"),
        (dict(sweeps=2.5), "sweeps must be an integer"),
        (dict(momentum=1.0), "momentum must be a number in"),
        (dict(alpha=0.0), "alpha must be a number in"),
        (dict(backend="cupy"), "backend must be one of"),
        (dict(batching="compact"), "batching must be one of"),
        (dict(engine="other"), "engine must be one of"),
        (dict(device="gpu"), "device must be 'cpu' or 'cuda'"),
        (dict(backend="numpy", device="cuda"), "numpy backend runs on the CPU only"),
        (dict(positions=pos + 500), "outside the"),
    ]
    for change, message in cases:
        kwargs = dict(start=start, amplitude=amp, positions=pos, probe=P, sweeps=1, backend="numpy")
        kwargs.update(change)
        with pytest.raises(ValueError, match=message):
            refine(**kwargs)
    broken = Reconstruction(np.full_like(start.object, np.nan), start.weight, start.x_coords, start.y_coords)
    with pytest.raises(ValueError, match="NaN or infinite"):
        refine(broken, amp, pos, P, sweeps=1, backend="numpy")
    if _onnx_available():
        with pytest.raises(ValueError, match="backend='numpy'"):
            refine(start, amp, pos, P, sweeps=1, backend="onnx", batching="parallel")


def _onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def test_torch_is_not_imported_by_the_numpy_or_onnx_paths(problem):
    import subprocess
    import sys

    code = ("import sys; import numpy as np; from ptycho_runtime.refinement import refine; "
            "import ptycho_runtime.refinement.onnx_graph, ptycho_runtime.refinement.numpy_backend; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _counted(amp: np.ndarray, photons: float, seed: int = 0) -> tuple[np.ndarray, float]:
    """``amp`` as an instrument measures it: sqrt(Poisson counts)/s at ``photons`` per frame; returns (frames, s)."""
    s = float(np.sqrt(photons / np.mean(np.sum(amp.astype(np.float64) ** 2, axis=(1, 2)))))
    counts = np.random.default_rng(seed).poisson((amp.astype(np.float64) * s) ** 2)
    return (np.sqrt(counts) / s).astype(np.float32), s


def test_the_noise_floor_is_what_the_true_object_leaves_and_unknown_for_non_count_data(problem):
    from ptycho_runtime.refinement.noise_floor import photon_quantum, poisson_floor

    _, amp, _, _, _ = problem
    for photons in (1e4, 1e6):
        noisy, s = _counted(amp, photons)
        assert photon_quantum(noisy) == pytest.approx(s, rel=1e-5)
        truth_misfit = float(np.mean((noisy.astype(np.float64) - amp) ** 2))
        assert poisson_floor(noisy) == pytest.approx(truth_misfit, rel=0.2)
    smeared = noisy + np.random.default_rng(1).uniform(0, 1e-3, noisy.shape).astype(np.float32)  # not counts
    assert photon_quantum(smeared) is None and poisson_floor(smeared) is None
    assert photon_quantum(np.zeros((2, 4, 4), np.float32)) is None


def test_auto_probe_rule_keeps_a_good_guess_and_refines_a_wrong_one(problem, caplog):
    from ptycho_runtime.inference.scan_refinement import PROBE_SUSPECT, RefineSettings, refine_scan

    obj, amp, pos, start, lit = problem
    noisy, _ = _counted(amp, 1e6)
    settings = RefineSettings(sweeps=30, start="flat", refine_probe="auto")
    good = refine_scan(start, noisy, pos, _probe(), settings, probe_source="the test's probe").refinement
    assert good["probe_rule"] == "auto" and not good["probe_updated"]
    assert good["misfit_over_floor"] < PROBE_SUSPECT and "fixed_misfit_over_floor" not in good
    with caplog.at_level("WARNING", logger="ptycho_runtime"):
        wrong = refine_scan(start, noisy, pos, _probe(defocus=0.2), settings, probe_source="the test's probe")
    record = wrong.refinement
    assert record["probe_updated"] and record["fixed_misfit_over_floor"] > PROBE_SUSPECT
    assert record["misfit_over_floor"] == record["refined_probe_misfit_over_floor"]  # the better fit was kept
    assert record["misfit_over_floor"] < 0.5 * record["fixed_misfit_over_floor"]
    assert "noise floor" in caplog.text and "probe refined" in caplog.text
    kept = refine_scan(start, noisy, pos, _probe(defocus=0.2), RefineSettings(sweeps=30, start="flat",
                       refine_probe=False), probe_source="the test's probe")
    assert not kept.refinement["probe_updated"] and kept.refinement["misfit_over_floor"] > PROBE_SUSPECT
    assert _error(wrong.object, obj, lit) < 0.7 * _error(kept.object, obj, lit)
    with pytest.raises(ValueError, match="refine_probe must be"):
        RefineSettings(refine_probe="yes")


def test_auto_is_the_default_and_a_poor_fit_with_the_probe_refined_is_warned_about(problem, caplog):
    from ptycho_runtime.inference.scan_refinement import PROBE_SUSPECT, RefineSettings, refine_scan

    _, amp, pos, start, _ = problem
    noisy, _ = _counted(amp, 1e6)
    assert RefineSettings().refine_probe == "auto"  # the rule the previous test exercises
    with caplog.at_level("WARNING", logger="ptycho_runtime"):
        short = refine_scan(start, noisy, pos, _probe(defocus=0.2), RefineSettings(sweeps=2, start="flat",
                            refine_probe=True, max_sweeps=0), probe_source="the test's probe").refinement
    assert short["probe_updated"] and short["sweeps"] == 2 == len(short["misfit_per_sweep"])
    assert short["misfit_over_floor"] > PROBE_SUSPECT and "more sweeps" in caplog.text
    assert short["sweeps_extended"] == 0 and short["max_sweeps"] == 0


def test_a_refined_probe_that_leaves_the_fit_far_above_the_noise_sweeps_on_until_explained(problem, caplog):
    """A defocused guess, refined, ends far above the noise at 2 sweeps: the extension runs until it is explained.

    Against the same run capped at its 2 sweeps: no warning, a much better object, the polish after the first
    check below PROBE_SUSPECT, progress counted out of the limit, a limit that holds mid-block, and nothing added
    with the probe fixed.
    """
    from ptycho_runtime.inference.scan_refinement import (
        DEFAULT_MAX_SWEEPS,
        POLISH_SWEEPS,
        PROBE_SUSPECT,
        RefineSettings,
        refine_scan,
    )

    obj, amp, pos, start, lit = problem
    noisy, _ = _counted(amp, 1e6)
    wrong = _probe(defocus=0.2)
    seen: list[tuple[int, int]] = []
    runs = {}
    for name, cap in (("capped", 0), ("extended", DEFAULT_MAX_SWEEPS)):
        settings = RefineSettings(sweeps=2, start="flat", refine_probe=True, max_sweeps=cap,
                                  progress=lambda done, total: seen.append((done, total)))
        with caplog.at_level("WARNING", logger="ptycho_runtime"):
            caplog.clear()
            runs[name] = refine_scan(start, noisy, pos, wrong, settings, probe_source="the test's probe")
            warned = "Poisson noise" in caplog.text
        assert warned is (name == "capped")  # the extended run ends explained, so it is not warned about
    record = runs["extended"].refinement
    floor, per_sweep = record["noise_floor"], record["misfit_per_sweep"]
    assert record["max_sweeps"] == DEFAULT_MAX_SWEEPS == RefineSettings().max_sweeps
    assert record["sweeps_requested"] == 2 and record["sweeps"] == 2 + record["sweeps_extended"]
    assert len(per_sweep) == 2 + record["extension_sweeps_run"] >= record["sweeps"]
    assert 2 < record["sweeps"] < DEFAULT_MAX_SWEEPS and record["misfit_over_floor"] < PROBE_SUSPECT
    # it stopped POLISH_SWEEPS after the first check that found the fit explained, and not one block sooner
    assert per_sweep[-POLISH_SWEEPS - 1] <= PROBE_SUSPECT * floor < per_sweep[-POLISH_SWEEPS - 5]
    assert record["misfit_over_floor"] * floor == pytest.approx(min(per_sweep[1::4] + per_sweep[-1:]), rel=1e-6)
    assert seen[-1] == (record["sweeps"], DEFAULT_MAX_SWEEPS)  # progress counts the extension out of its limit
    assert _error(runs["extended"].object, obj, lit) < 0.6 * _error(runs["capped"].object, obj, lit)
    limited = refine_scan(start, noisy, pos, wrong, RefineSettings(sweeps=2, start="flat", refine_probe=True,
                          max_sweeps=7), probe_source="the test's probe").refinement
    assert limited["sweeps"] == 7 and limited["misfit_over_floor"] > PROBE_SUSPECT  # the limit holds mid-block
    fixed = refine_scan(start, noisy, pos, wrong, RefineSettings(sweeps=2, start="flat", refine_probe=False),
                        probe_source="the test's probe").refinement
    assert fixed["sweeps"] == 2 and fixed["sweeps_extended"] == 0  # more sweeps cannot correct a fixed probe
    with pytest.raises(ValueError, match="max_sweeps must be an integer >= 0"):
        RefineSettings(max_sweeps=-1)


def test_the_default_amplitude_prior_lowers_the_amplitude_error_within_the_datas_noise(problem):
    from ptycho_runtime.inference.scan_refinement import RefineSettings, refine_scan

    obj, amp, pos, start, lit = problem
    noisy, _ = _counted(amp, 1e4)
    assert RefineSettings().amplitude_prior == "tv"
    from dataclasses import replace

    truth = replace(start, object=obj)  # started at the truth, what refinement leaves wrong is the data's noise
    runs = {prior: refine_scan(truth, noisy, pos, _probe(), RefineSettings(sweeps=20, start="network",
                               amplitude_prior=prior), probe_source="the test's probe") for prior in ("tv", "none")}
    prior = runs["tv"].refinement["amplitude_prior"]
    assert runs["none"].refinement["amplitude_prior"] == {"rule": "none"}
    assert prior["applied"] and prior["weight"] > 0 and prior["misfit_ratio"] < 1.1  # still fits the data

    def amplitude_error(o: np.ndarray) -> float:
        a, t = np.abs(o[lit]), np.abs(obj[lit])
        return float(np.linalg.norm(a * (np.vdot(a, t).real / np.vdot(a, a).real) - t) / np.linalg.norm(t))

    # this small scan's error is mostly smoother than a pixel, which the prior leaves (a 6 % gain here; on the
    # realistic scans, whose grain is finer, amplitude SSIM 0.84 -> 0.95: docs/fidelity.md)
    assert amplitude_error(runs["tv"].object) < 0.97 * amplitude_error(runs["none"].object)
    np.testing.assert_allclose(np.angle(runs["tv"].object[lit]), np.angle(runs["none"].object[lit]), atol=1e-5)
    with pytest.raises(ValueError, match="amplitude_prior must be one of tv, none"):
        RefineSettings(amplitude_prior="median")


def test_a_stream_judges_its_fit_against_the_noise_floor_and_warns_once(problem, caplog):
    from ptycho_runtime.inference.scan_refinement import PROBE_SUSPECT, RefineSettings
    from ptycho_runtime.inference.stream_refinement import StreamRefinement

    _, amp, pos, start, _ = problem
    noisy, _ = _counted(amp, 1e6)
    half = len(pos) // 2
    records = {}
    for name, probe in (("right", _probe()), ("wrong", _probe(defocus=0.2))):
        stream = StreamRefinement(RefineSettings(sweeps=20, start="flat"), probe, N, probe_source="the test's probe")
        with caplog.at_level("WARNING", logger="ptycho_runtime"):
            caplog.clear()
            for part in (slice(0, half), slice(half, None)):  # two micro-batches: the floor is averaged over both
                stream.add(start, noisy[part], pos[part])
                stream.sweep(20)
            stream.sweep(5)  # nothing owed: no sweep, no second warning
            records[name] = stream.apply(start).refinement
            warnings = [r for r in caplog.records if "Poisson noise" in r.getMessage()]
        assert len(warnings) == (name == "wrong"), [r.getMessage() for r in warnings]
    assert records["right"]["noise_floor"] > 0
    assert records["right"]["noise_floor"] == pytest.approx(records["wrong"]["noise_floor"])
    assert records["right"]["misfit_over_floor"] < PROBE_SUSPECT < records["wrong"]["misfit_over_floor"]


def test_a_phase_ramp_put_on_the_true_object_is_fitted_back_off(problem):
    from ptycho_runtime.refinement.phase_ramp import fit_phase_ramp, ramp_factor

    obj, amp, pos, start, _ = problem
    starts = pos - (N - 1) / 2  # the canvas is the object's own grid (origin 0, 0)
    fit = fit_phase_ramp(obj * ramp_factor(obj.shape, (0.004, -0.003)), amp, _probe(), starts)
    np.testing.assert_allclose(fit.rad_per_px, (-0.004, 0.003), rtol=0.02)
    assert fit.applied and fit.misfit_after < 1e-3 * fit.misfit_before
    exact = fit_phase_ramp(obj, amp, _probe(), starts)
    assert np.abs(exact.rad_per_px).max() < 1e-5  # the truth carries no ramp to remove
    record = fit.record(after_sweep=10)
    assert record["after_sweep"] == 10 and record["applied"] and record["misfit_ratio"] < 1e-3


@pytest.mark.parametrize("backend", _backends())
def test_multiplying_the_object_mid_run_agrees_across_backends(problem, backend):
    from ptycho_runtime.refinement.phase_ramp import ramp_factor

    _, amp, pos, start, _ = problem
    runs = []
    for name in ("numpy", backend):
        refiner = Refiner(start, _probe(), backend=name).add_frames(amp, pos)
        refiner.run(5)
        refiner.multiply_object(ramp_factor(start.object.shape, (0.01, -0.02)))  # momentum is carried along
        runs.append(refiner.run(5).reconstruction.object)
    assert np.linalg.norm(runs[1] - runs[0]) / np.linalg.norm(runs[0]) < 1e-4
    with pytest.raises(ValueError, match="canvas's shape"):
        refiner.multiply_object(np.ones((3, 3), np.complex64))


def test_scan_refinement_fits_the_phase_ramp_while_the_probe_is_fixed_and_records_it(problem):
    from dataclasses import replace

    from ptycho_runtime.inference.scan_refinement import RefineSettings, refine_scan
    from ptycho_runtime.refinement.phase_ramp import DEFAULT_EVERY, ramp_factor

    obj, amp, pos, start, lit = problem
    assert DEFAULT_EVERY == 10 and RefineSettings().phase_ramp_every == 0  # the phase field's fits include the ramp
    ramped = replace(start, object=(obj * ramp_factor(obj.shape, (0.02, -0.015))).astype(np.complex64))
    runs = {every: refine_scan(ramped, amp, pos, _probe(), RefineSettings(
        sweeps=10, start="network", phase_ramp_every=every, amplitude_prior="none", refine_probe=False,
        phase_field_every=0, coarse_sweeps=0),
        probe_source="the test's probe") for every in (0, 5)}
    fits = runs[5].refinement["phase_ramp_fits"]
    assert [f["after_sweep"] for f in fits] == [5, 10] and all(f["applied"] for f in fits)
    assert runs[5].refinement["phase_ramp_every"] == 5 and runs[0].refinement["phase_ramp_fits"] == []
    assert _error(runs[5].object, obj, lit) < 0.9 * _error(runs[0].object, obj, lit)
    free = refine_scan(ramped, amp, pos, _probe(), RefineSettings(sweeps=10, start="network", phase_ramp_every=5,
                       refine_probe=True), probe_source="the test's probe")
    assert free.refinement["phase_ramp_fits"] == [] and free.refinement["phase_ramp_every"] == 0  # a free probe
    # takes a ramp with it: no fit then
    with pytest.raises(ValueError, match="phase_ramp_every must be an integer >= 0"):
        RefineSettings(phase_ramp_every=-1)


def test_the_ramp_fits_misfit_is_far_field_misfit_of_the_ramped_object(problem):
    from ptycho_runtime.refinement.phase_ramp import RampFit, fit_phase_ramp, ramp_factor

    obj, amp, pos, start, _ = problem
    starts = pos - (N - 1) / 2
    noisy = amp * np.float32(1.05)  # a misfit well above round-off, so the two sums can be compared
    fit = fit_phase_ramp(obj, noisy, _probe(), starts, sample=len(pos))
    assert isinstance(fit, RampFit)
    assert fit.misfit_before == pytest.approx(far_field_misfit(obj, noisy, _probe(), starts), rel=1e-4)
    ramped = obj * ramp_factor(obj.shape, fit.rad_per_px)
    assert fit.misfit_after == pytest.approx(far_field_misfit(ramped, noisy, _probe(), starts), rel=1e-3)


def test_a_ramp_fit_takes_at_most_a_quarter_far_field_pixel_at_once(problem):
    from ptycho_runtime.refinement.phase_ramp import MAX_SHIFT_PX, fit_phase_ramp, ramp_factor

    obj, amp, pos, start, _ = problem
    starts = pos - (N - 1) / 2
    far = 2 * np.pi * 0.6 / N  # 0.6 far-field px: more than one fit may take
    fit = fit_phase_ramp(obj * ramp_factor(obj.shape, (far, 0.0)), amp, _probe(), starts)
    assert np.hypot(*fit.rad_per_px) <= 2 * np.pi * MAX_SHIFT_PX / N * (1 + 1e-9)
    assert fit.rad_per_px[0] < 0 and fit.applied  # towards the truth, and the frames fit better for it


def test_the_extension_keeps_the_best_fitting_result_it_saw(monkeypatch):
    """Where a later block fits worse (a fit the model, not the probe, limits, wanders), the best result is kept."""
    from ptycho_runtime.inference import scan_refinement as sr
    from ptycho_runtime.refinement.result import RefineResult

    after_each_block = iter([10.0, 6.0, 9.0, 12.0, 11.0])  # misfit over a floor of 1: never explained

    def block(refiner, sweeps, *args, **kwargs):
        assert sweeps == sr.EXTEND_BLOCK
        return RefineResult(reconstruction=None, probe=None, record={"misfit": [next(after_each_block)]})

    monkeypatch.setattr(sr, "run_fitting_phase", block)
    settings = sr.RefineSettings(sweeps=4, max_sweeps=24, refine_probe=True)
    start = RefineResult(reconstruction=None, probe=None, record={"misfit": [20.0]})
    kept, extended, run = sr._sweep_until_explained(None, start, None, None, settings, 1.0, None, {})
    assert kept.record["misfit"] == [6.0] and extended == 8 and run == 20  # the 2nd of 5 blocks, all 20 run


def test_the_auto_start_keeps_a_network_start_that_helps_and_drops_one_that_is_noise(problem):
    """start="auto" tries the network's phase and a flat object for two sweeps and finishes the best.

    A start near the truth (what a network trained for the probe gives) is kept; a start of random phase (what
    a network gives under a probe it never saw) fits worse than flat after two sweeps and is dropped for flat.
    """
    from dataclasses import replace

    from ptycho_runtime.inference.scan_refinement import AUTO_STARTS, RefineSettings, refine_scan

    obj, amp, pos, start, lit = problem
    settings = RefineSettings(sweeps=6, refine_probe=False, amplitude_prior="none", phase_ramp_every=0)
    assert RefineSettings().start == "auto" and set(AUTO_STARTS) == {"network phase", "flat"}
    near = replace(start, object=np.where(start.covered, obj * np.exp(0.05j), 1).astype(np.complex64))
    good = refine_scan(near, amp, pos, _probe(), settings, probe_source="the test's probe").refinement
    assert good["start"] == "network phase" and set(good["start_misfit"]) == set(AUTO_STARTS)
    rng = np.random.default_rng(7)
    noise = np.exp(1j * rng.uniform(-np.pi, np.pi, obj.shape)).astype(np.complex64)
    wild = replace(start, object=np.where(start.covered, noise, 1).astype(np.complex64))
    chosen = refine_scan(wild, amp, pos, _probe(), settings, probe_source="the test's probe")
    assert chosen.refinement["start"] == "flat"
    assert chosen.refinement["start_misfit"]["flat"] < chosen.refinement["start_misfit"]["network phase"]
    forced = refine_scan(wild, amp, pos, _probe(), replace(settings, start="network phase"),
                         probe_source="the test's probe")
    assert _error(chosen.object, obj, lit) < _error(forced.object, obj, lit)  # dropping the noise was right


def test_a_flat_start_replaces_the_networks_only_when_it_fits_clearly_better():
    from ptycho_runtime.inference.refine_start import FLAT_MARGIN, choose_start

    assert choose_start({"network": 1.0, "network phase": 0.98, "flat": 0.97}) == "network phase"  # a near tie
    assert choose_start({"network": 1.0, "network phase": 1.2, "flat": 0.99 * FLAT_MARGIN}) == "flat"
    assert choose_start({"network": 1.0, "flat": 0.5}) == "flat" and choose_start({"flat": 2.0}) == "flat"
    assert choose_start({"network": 1.0, "network phase": 2.0}) == "network"
