"""Refinement sweeps per second: each backend of the batched engine against the one-frame-at-a-time numpy loop.

One synthetic scan (``REFINE_FRAMES`` frames of 64², a Fermat spiral at the
held-out scan's density, a smooth complex object, noiseless amplitudes: the
timing does not depend on the values). One timed round = one sweep over all
frames, continuing from the previous round's object (as refinement does).

Paths (group ``refine_N64_n{frames}``):
- ``epie_loop``: ``refine_epie(iterations=1)``, the original numpy loop (the reference for the ratios);
- ``numpy`` / ``numba`` / ``onnx_cpu`` / ``torch_cpu``: ``Refiner(..., backend=...).run(1)`` on the CPU
  (``numba``: the compiled batch step on one thread per core, 2 at most; ``numba_1thread``: on one;
  ``onnx_cpu``: each batch split between one thread per core, 2 at most, each running the graph on one
  onnxruntime thread; ``onnx_cpu_1thread``: the whole batch in one call on one thread);
- ``onnx_dft_floor``: only the step graph's two 2-D DFTs (``onnx_graph.build_transform_graph``) on the
  same batches, split between the same threads: the matrix products every step graph must run, so the
  most that ``onnx_cpu``'s ratio could reach with every other operator and the host's work free;
- ``torch_cuda`` / ``onnx_cuda``: the same on a GPU (skipped without one);
- ``amplitude_prior``: one application of the amplitude prior that ends every
  refinement (``object_prior.apply_amplitude_prior``, TV at the noise level) to
  the scan's object with 2 % noise, for scale against a sweep (its row's
  "sweeps/s" is applications per second);
- ``phase_field``: one fit of the object's slow phase (``phase_field.PhaseField.fit``,
  run every 4 sweeps by the default path) on the same scan from the flat start, for
  scale against a sweep (its row's "sweeps/s" is fits per second).
report.py prints sweeps/s and the ratio to ``epie_loop`` of the same run.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from ._common import SMOKE, common_info, latency_info, timed_pedantic, torch_cuda_available

N = 64
REFINE_FRAMES = 200 if SMOKE else 1000
PATHS = ("epie_loop", "numpy", "numba", "numba_1thread", "onnx_cpu", "onnx_cpu_1thread", "onnx_dft_floor", "torch_cpu",
         "torch_cuda", "onnx_cuda",
         "amplitude_prior", "phase_field")
GROUP = f"refine_N{N}_n{REFINE_FRAMES}"


@pytest.fixture(scope="module")
def scan():
    """Positions, amplitudes, probe and a flat start on a canvas sized to the scan (stitching's default)."""
    from ptycho_runtime.reconstruction.stitching import StitchCanvas, canvas_bounds, probe_window

    k = np.arange(REFINE_FRAMES)
    radius = 5.6 * np.sqrt(k + 0.5)  # ≈ 1 position per 100 px², as the held-out scan (1,000 in ≈ 356² px)
    angle = k * np.pi * (3 - np.sqrt(5))
    positions = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1) + 250.0
    (x0, y0), shape = canvas_bounds(positions, N)
    y, x = np.mgrid[:N, :N] - (N - 1) / 2
    r2 = (x**2 + y**2) / 12.0**2
    probe = (np.exp(-r2) * np.exp(1j * 0.8 * r2)).astype(np.complex64)
    rng = np.random.default_rng(3)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(shape[1]), np.fft.fftfreq(shape[0])))
    smooth = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * np.exp(-(f / 0.05) ** 2)))
    smooth /= np.abs(smooth).max()
    obj = ((0.8 + 0.15 * smooth) * np.exp(1j * smooth)).astype(np.complex64)
    starts = positions - (N - 1) / 2 - np.array([x0, y0])
    patches = np.stack([obj[int(r):int(r) + N, int(c):int(c) + N] for c, r in starts])  # integer reads: timing only
    amplitude = (np.abs(np.fft.fftshift(np.fft.fft2(probe * patches), axes=(-2, -1))) / N).astype(np.float32)
    canvas = StitchCanvas(shape, N, origin=(x0, y0), window=probe_window(probe))
    canvas.add(np.ones((REFINE_FRAMES, N, N), np.complex64), positions)
    return {"positions": positions, "amplitude": amplitude, "probe": probe, "start": canvas.result(), "object": obj}


def _skip_unless(path: str) -> None:
    if path.startswith("torch") and importlib.util.find_spec("torch") is None:
        pytest.skip("torch not installed")
    if path.startswith("numba") and importlib.util.find_spec("numba") is None:
        pytest.skip("numba not installed (the runtime's [fast] extra)")
    if path.startswith("onnx") and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed")
    if path == "torch_cuda" and not torch_cuda_available():
        pytest.skip("torch sees no CUDA device")
    if path == "onnx_cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a CUDA host)")


@pytest.mark.parametrize("path", [pytest.param(p, marks=[pytest.mark.gpu] if "cuda" in p else []) for p in PATHS])
def test_refine_sweep(benchmark, scan, path):
    from ptycho_runtime.refinement import Refiner, refine_epie

    _skip_unless(path)
    amp, pos, probe, start = scan["amplitude"], scan["positions"], scan["probe"], scan["start"]
    info = {"device": "cuda" if "cuda" in path else "cpu"}
    if path == "epie_loop":
        state = [start]

        def sweep():
            state[0] = refine_epie(state[0], amp, pos, probe, iterations=1)

        info.update(backend="numpy loop", batches=REFINE_FRAMES)
    elif path == "amplitude_prior":
        from ptycho_runtime.refinement.object_prior import apply_amplitude_prior, well_lit

        rng = np.random.default_rng(4)
        noisy = (scan["object"] * (1 + 0.02 * rng.standard_normal(scan["object"].shape))).astype(np.complex64)
        lit, region = well_lit(start.weight), start.covered
        record = {}

        def sweep():
            record.update(apply_amplitude_prior(noisy, lit, region, "tv")[1])

        info.update(backend="numpy", batches="-")
    elif path == "phase_field":
        from ptycho_runtime.reconstruction.geometry import frame_origin
        from ptycho_runtime.refinement.phase_field import PhaseField

        starts = frame_origin(pos, N) - np.array([float(start.x_coords[0]), float(start.y_coords[0])])
        field = PhaseField(start.object.shape, probe, starts)
        flat = np.where(start.covered, start.object, 1).astype(np.complex64)
        field_amp, fits = amp[field.frames], []

        def sweep():
            fits.append(field.fit(flat, field_amp, probe)[1])

        from ptycho_runtime.reconstruction.compiled import available_kernels

        info.update(backend="numba" if available_kernels() else "numpy", batches=f"{len(field.frames)} frames")
    elif path == "onnx_dft_floor":
        sweep, check = _dft_floor(scan)
        info.update(backend="onnx (the two DFTs only)", batches="as onnx_cpu")
    else:
        backend = path.split("_")[0]
        options = {"threads": 1} if path.endswith("_1thread") else None
        try:
            refiner = Refiner(start, probe, backend=backend, device=info["device"],
                              backend_options=options).add_frames(amp, pos)
        except ValueError as exc:  # e.g. the CUDA provider did not load
            pytest.skip(f"{path} unusable: {exc}")

        def sweep():
            refiner.run(1)

        info.update(backend=backend, batches=len(refiner.batches()))
        if backend == "numba":
            info.update(threads=refiner._backend.threads, compiled_fft=refiner._backend.compiled_fft)
        if backend == "onnx":
            info.update(provider=refiner._backend.providers[0], threads=refiner._backend.threads)
    benchmark.group = GROUP
    data = timed_pedantic(benchmark, sweep, min_rounds=3, slow_rounds=3)
    if path == "amplitude_prior":  # functional check: it ran, at the noise it was given
        assert record["applied"] and 0.01 < record["weight"] < 0.04, record
    elif path == "phase_field":  # functional check: a flat start's slow phase is wrong, and the fit lowers the misfit
        assert fits and fits[-1].applied and fits[-1].misfit_after < fits[-1].misfit_before
    elif path == "onnx_dft_floor":  # functional check: the graph's inverse undoes its forward transform
        assert check() < 1e-4
    elif path != "epie_loop":  # functional check: the sweeps moved the object towards the data
        sweep()
        m = refiner.misfit
        assert np.isfinite(m).all() and m[-1] < m[0]
    stats = latency_info(data, REFINE_FRAMES)
    benchmark.extra_info.update({
        "kind": "refine", "path": path, **info, "N": N, "frames": REFINE_FRAMES,
        "sweeps_per_s": (1e3 / stats["p50_ms"]) if stats else None, **stats, **common_info(),
    })


def _dft_floor(scan):
    """One round of ``onnx_dft_floor``: each of the onnx backend's batches through the two DFTs, split as it splits
    them; and a check that returns the largest relative round-trip error of the last batch."""
    import onnxruntime as ort

    from ptycho_runtime.refinement import Refiner
    from ptycho_runtime.refinement.onnx_backend import session_options
    from ptycho_runtime.refinement.onnx_graph import build_transform_graph

    refiner = Refiner(scan["start"], scan["probe"], backend="onnx").add_frames(scan["amplitude"], scan["positions"])
    backend, sizes = refiner._backend, [len(g) for g in refiner.batches()]
    sess = ort.InferenceSession(build_transform_graph(N).SerializeToString(), session_options(1),  # as the backend's
                                providers=["CPUExecutionProvider"])
    frames = np.random.default_rng(5).standard_normal((max(sizes), N, 2, N)).astype(np.float32)
    last = {}

    def sweep():
        for n in sizes:
            last["out"] = backend._in_parts(n, lambda part: sess.run(None, {"frames": frames[part]})[0])

    def check():
        out = np.concatenate(last["out"])
        return float(np.abs(out - frames[:len(out)]).max() / np.abs(frames[:len(out)]).max())

    return sweep, check
