"""Partial canvases add up exactly: the reduction ``infer-many`` relies on (numpy only, no Dask needed)."""

from __future__ import annotations

import numpy as np
import pytest

from ptycho_runtime.distributed.infer_many import Partial, ScanPlan, finish_scan, merge_partials
from ptycho_runtime.reconstruction.stitching import StitchCanvas, canvas_bounds, probe_window, stitch_patches

N = 16


def _scan(n=60, seed=1):
    rng = np.random.default_rng(seed)
    pos = rng.uniform(N, 70, (n, 2))  # fractional positions: bilinear splats cross partial boxes
    patches = (rng.normal(size=(n, N, N)) + 1j * rng.normal(size=(n, N, N))).astype(np.complex64)
    yy, xx = np.mgrid[:N, :N] - (N - 1) / 2
    probe = np.exp(-(xx**2 + yy**2) / 30.0)
    return patches, pos, probe_window(probe)


def _partial(patches, pos, window) -> Partial:
    canvas = StitchCanvas.for_positions(pos, N, window=window)
    canvas.add(patches, pos)
    return Partial(canvas.origin, *canvas.sums(), n_patches=canvas.n_patches)


@pytest.mark.parametrize("chunk", [1, 7, 25])
def test_chunked_partials_reduce_to_the_one_canvas(chunk):
    patches, pos, window = _scan()
    ref = stitch_patches(patches, pos, window=window)
    parts = [_partial(patches[a:a + chunk], pos[a:a + chunk], window) for a in range(0, len(pos), chunk)]
    # each partial covers only its chunk's box, not the whole scan
    assert all(p.wsum.size < ref.weight.size for p in parts) or chunk >= len(pos)
    origin, shape = canvas_bounds(pos, N)
    plan = ScanPlan(len(pos), len(pos), origin, shape, pos, {"N": N}, "onnx", "cpu", ["CPUExecutionProvider"])
    direct = finish_scan(plan, *parts)
    tree = finish_scan(plan, *[merge_partials(*parts[i:i + 3]) for i in range(0, len(parts), 3)])
    for got in (direct, tree):
        np.testing.assert_array_equal(got.x_coords, ref.x_coords)
        np.testing.assert_array_equal(got.y_coords, ref.y_coords)
        np.testing.assert_allclose(got.weight, ref.weight, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got.object, ref.object, rtol=0, atol=1e-6)
    assert merge_partials(*parts).n_patches == len(pos)


def test_add_sums_refuses_a_partial_outside_the_canvas():
    patches, pos, window = _scan(n=5)
    part = _partial(patches, pos, window)
    small = StitchCanvas((10, 10), N, (0, 0), crop=N)
    with pytest.raises(ValueError, match="does not fit"):
        small.add_sums(part.origin, part.re, part.im, part.wsum)


def test_sums_are_copies():
    patches, pos, window = _scan(n=3)
    canvas = StitchCanvas.for_positions(pos, N, window=window)
    canvas.add(patches, pos)
    re, _, wsum = canvas.sums()
    re[:] = 0
    wsum[:] = 0
    assert canvas.result().weight.max() > 0


def test_the_driver_writes_what_infer_writes_from_the_workers_report(tmp_path):
    """The last stage of a scan: the driver, which never holds a Bundle, writes the file from a Provenance."""
    import h5py

    from ptycho_runtime.distributed.infer_many import ScanResult, _ScanRun

    patches, pos, window = _scan()
    canvas = StitchCanvas.for_positions(pos, N, window=window)
    canvas.add(patches, pos)
    params = {"N": N, "gridsize": 1, "intensity_scale": 3.5, "probe": np.ones((N, N), np.complex64)}
    plan = ScanPlan(len(pos), len(pos), canvas.origin, canvas.shape, pos, params, "onnx", "cpu",
                    ["CPUExecutionProvider"])

    class Done:  # a finished future
        def result(self):
            return canvas.result()

    scan, out = str(tmp_path / "scan.npz"), tmp_path / "scan.h5"
    results = {scan: ScanResult(scan, out)}
    run = _ScanRun(None, "plugin", str(tmp_path / "wts.h5"), results, 8, None, None)
    fut = Done()
    run.stage[fut], run.plans[scan], run.started[scan], run.held[scan] = (scan, "final"), plan, 0.0, []
    assert run.advance(fut) is None and results[scan].ok and results[scan].n_patterns == len(pos)
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["object"][()], canvas.result().object)
        assert f.attrs["format"] == "ptycho-runtime-reconstruction" and f.attrs["backend"] == "onnx"
        assert f.attrs["N"] == N and f.attrs["intensity_scale"] == 3.5 and f.attrs["n_patterns"] == len(pos)
        assert f.attrs["bundle_path"] == str((tmp_path / "wts.h5").resolve()) and "probe" in f
