"""Bundle: inference against eager references, the counts contract, load errors, thread safety."""

from __future__ import annotations

import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

import ptycho_runtime as pr
from ptycho_runtime import format as fmt
from ptycho_runtime.files.npz import read_npz_arrays

NAMES = ("n64_g1", "n64_g2")


def _eager_tol(ref) -> float:
    """1e-4 of the output's scale: the graph-vs-eager contract (parity.DEFAULT_TOLERANCE; fixtures are retrained
    on every CI run and a fresh model's ONNX graph may sit anywhere below it, e.g. 2e-5)."""
    return 1e-4 * max(1.0, float(np.abs(np.asarray(ref)).max()))



def _eager_parity(bundle: pr.Bundle, case: str = "b3") -> tuple[np.ndarray, np.ndarray]:
    """(normalised input [B, C, N, N], eager complex output) from the bundle's stored parity vectors."""
    par = bundle.contents.parity[case]
    x = par["input.amplitude"]
    ref = par["diffraction_to_obj.amplitude"] * np.exp(1j * par["diffraction_to_obj.phase"].astype(np.float64))
    return x, ref


def _scan(path: Path) -> tuple[dict, np.ndarray]:
    scan = read_npz_arrays(path.parent / "scan.npz")
    return scan, np.stack([scan["xcoords"], scan["ycoords"]], axis=1)


@pytest.fixture(scope="module")
def bundles(fixture_dir) -> dict[str, pr.Bundle]:
    return {name: pr.load_bundle(fixture_dir / name / "wts.h5") for name in NAMES}


# --------------------------------------------------------------------------- predict vs eager


@pytest.mark.parametrize("name", NAMES)
def test_predict_matches_stored_eager_parity(bundles, name):
    b = bundles[name]
    for case in ("b1", "b3"):
        x, ref = _eager_parity(b, case)
        got = b.predict(x)
        assert got.dtype == np.complex64 and got.shape == ref.shape == (x.shape[0], b.channels, b.N, b.N)
        np.testing.assert_allclose(got, ref, rtol=0, atol=_eager_tol(ref))


def _training_side_patches(path):
    """The training side's own path on the fixture scan: load_torch_bundle, make_groups, eager predict.

    Returns (scan, groups, patches)."""
    pytest.importorskip("torch")
    pytest.importorskip("ptycho_export")
    from ptycho_export import params
    from ptycho_export.data import load_npz, make_groups
    from ptycho_export.model_manager import load_torch_bundle
    from ptycho_export.training import predict_patches

    try:
        model, p = load_torch_bundle(path, "diffraction_to_obj")
        data = load_npz(path.parent / "scan.npz")
        g = make_groups(data, int(p["gridsize"]))
        return data, g, predict_patches(model, g.diffraction, float(p["intensity_scale"]))
    finally:
        params.reset_cfg()


@pytest.mark.parametrize("name", NAMES)
def test_predict_matches_torch_eager_on_scan(bundle_path, name):
    path = bundle_path(name)
    _, g, ref = _training_side_patches(path)
    b = pr.load_bundle(path)
    got = b.predict(g.diffraction, offsets=g.offsets, batch_size=16)
    np.testing.assert_allclose(got, ref, rtol=0, atol=_eager_tol(ref))


@pytest.mark.parametrize("name", NAMES)
def test_reconstruct_matches_training_eager_path(bundle_path, name):
    path = bundle_path(name)
    data, g, patches = _training_side_patches(path)
    b = pr.load_bundle(path)
    ref = pr.stitch_scan(patches, g.positions, window=pr.probe_window(b.probe))  # training's stitching path
    got = b.reconstruct(data.diffraction, np.stack([data.xcoords, data.ycoords], axis=1))
    assert got.object.shape == ref.object.shape
    np.testing.assert_array_equal(got.x_coords, ref.x_coords)
    np.testing.assert_array_equal(got.y_coords, ref.y_coords)
    np.testing.assert_allclose(got.weight, ref.weight, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.object, ref.object, rtol=0, atol=_eager_tol(ref.object))


def test_reconstruct_pregrouped_equals_flat_for_gridsize2(bundles):
    from ptycho_runtime.reconstruction.grouping import group_neighbors

    b = bundles["n64_g2"]
    scan, pos = _scan(b.path)
    flat = b.reconstruct(scan["diffraction"], pos)
    idx = group_neighbors(pos[:, 0], pos[:, 1], 2)
    grouped = b.reconstruct(scan["diffraction"][idx], pos[idx])
    np.testing.assert_array_equal(flat.object, grouped.object)
    # gridsize 1: [n, N, N] and [n, 1, N, N] with [n, 2] / [n, 1, 2] positions agree too
    b1 = bundles["n64_g1"]
    r1 = b1.reconstruct(scan["diffraction"], pos)
    r2 = b1.reconstruct(scan["diffraction"][:, None], pos[:, None])
    np.testing.assert_array_equal(r1.object, r2.object)
    assert r1.covered.any() and np.all(r1.weight[~r1.covered] == 0)


# --------------------------------------------------------------------------- counts contract


@pytest.mark.parametrize("name", NAMES)
def test_counts_equals_sqrt_counts_over_intensity_scale(bundles, name):
    b = bundles[name]
    x, _ = _eager_parity(b)
    counts = np.round((x.astype(np.float64) * b.intensity_scale) ** 2)  # photon counts
    got = b.predict(counts, counts=True)
    want = b.predict((np.sqrt(counts) / b.intensity_scale).astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=0, atol=_eager_tol(want))
    got_int = b.predict(counts.astype(np.uint32), counts=True)  # integer detector frames are fine
    np.testing.assert_allclose(got_int, got, rtol=0, atol=1e-6)


def test_positions_from_metres_both_conventions():
    x_m = np.array([0.0, 1e-6, -2e-6])
    y_m = np.array([0.0, 0.5e-6, 3e-6])
    # ptychodus convention: (0 m, 0 m) is the object centre ((W-1)/2, (H-1)/2)
    pos = pr.positions_from_metres(x_m, y_m, 1e-7, object_shape=(101, 51))
    np.testing.assert_allclose(pos, [[25.0, 50.0], [35.0, 55.0], [5.0, 80.0]])
    # without an object shape: relative to the scan minimum
    pos = pr.positions_from_metres(x_m, y_m, (1e-7, 5e-8))
    np.testing.assert_allclose(pos, [[20.0, 0.0], [30.0, 10.0], [0.0, 60.0]])
    # stage coordinates: the object centre (3 µm, -2 µm) is pixel ((W-1)/2, (H-1)/2), not (0 m, 0 m)
    pos = pr.positions_from_metres(x_m + 3e-6, y_m - 2e-6, 1e-7, object_shape=(101, 51), centre_m=(3e-6, -2e-6))
    np.testing.assert_allclose(pos, [[25.0, 50.0], [35.0, 55.0], [5.0, 80.0]], atol=1e-9)
    pos = pr.positions_from_metres(x_m, y_m, 1e-7, object_shape=(101, 51), centre_m=None)  # the scan's middle
    np.testing.assert_allclose(pos.min(axis=0) + pos.max(axis=0), [50.0, 100.0])
    with pytest.raises(ValueError, match="pixel_size_m must be finite and > 0"):
        pr.positions_from_metres(x_m, y_m, 0.0)
    with pytest.raises(ValueError, match="1-D arrays of equal length"):
        pr.positions_from_metres(x_m, y_m[:2], 1e-7)


# --------------------------------------------------------------------------- metadata


def test_info_params_and_repr(bundles):
    b = bundles["n64_g2"]
    info = b.info()
    assert (info.N, info.gridsize, info.backend, info.device, info.precision) == (64, 2, "onnx", "cpu", "fp32")
    assert info.format_version == 2 and info.output_mode == "amp_phase"
    assert "onnx/diffraction_to_obj" in info.graphs and info.providers == b.providers
    assert b.channels == 4 and b.default_batch_size() == 64
    p = b.params
    p["N"] = -1  # a copy: the bundle is not affected
    assert b.params["N"] == 64 and b.probe.shape == (64, 64)
    cfg = b.restore_params({"N": 128, "other": 1})
    assert cfg["N"] == 64 and cfg["gridsize"] == 2 and cfg["other"] == 1
    assert "N=64" in repr(b) and "gridsize=2" in repr(b)


def test_load_bundle_accepts_folder(fixture_dir):
    b = pr.load_bundle(fixture_dir / "n64_g1")
    assert b.path.name == "wts.h5" and b.N == 64


# --------------------------------------------------------------------------- load / option errors


def _still_works(b: pr.Bundle) -> None:
    x, ref = _eager_parity(b, "b1")
    np.testing.assert_allclose(b.predict(x), ref, rtol=0, atol=_eager_tol(ref))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(backend="tensorrt"), ValueError,
     r"backend must be one of auto, onnx, torchscript, triton \(got 'tensorrt'\)"),
    (dict(device="gpu"), ValueError, r"device must be one of auto, cpu, cuda \(got 'gpu'\)"),
    (dict(precision="bf16"), ValueError, r"precision must be one of fp32, fp16"),
    (dict(precision="fp16", device="cpu"), ValueError, r"fp16.*needs a CUDA device"),
])
def test_bad_load_options(bundle_path, bundles, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pr.load_bundle(bundle_path("n64_g1"), **kwargs)
    _still_works(bundles["n64_g1"])


def test_batch_size_zero_rejected_and_bundle_still_works(bundles):
    b = bundles["n64_g1"]
    x, _ = _eager_parity(b)
    with pytest.raises(ValueError, match=r"batch_size must be >= 1 \(got 0\)"):
        b.predict(x, batch_size=0)
    scan, pos = _scan(b.path)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        b.reconstruct(scan["diffraction"], pos, batch_size=-3)
    _still_works(b)


def test_a_batch_above_the_checked_one_is_split(bundles, monkeypatch):
    """Graph tensor sizes are proven for batches up to MAX_GRAPH_BATCH (format.graph_sizes): never run larger."""
    b = bundles["n64_g1"]
    seen = []
    run = b._backend.run
    monkeypatch.setattr(b._backend, "run", lambda x: (seen.append(len(x)), run(x))[1])
    monkeypatch.setattr(fmt, "MAX_GRAPH_BATCH", 2)
    x, _ = _eager_parity(b)
    got = b.predict(x, batch_size=10**6)
    assert max(seen) == 2 and len(x) > 2
    np.testing.assert_allclose(got, b.predict(x, batch_size=1), rtol=0, atol=1e-6)


def test_predict_batch_size_does_not_change_results(bundles):
    b = bundles["n64_g2"]
    x, _ = _eager_parity(b)
    np.testing.assert_allclose(b.predict(x, batch_size=1), b.predict(x, batch_size=64), rtol=0, atol=1e-6)


def test_bundle_without_onnx_graph(bundle_path, bundles):
    path = bundle_path("n64_g1")
    with h5py.File(path, "r+") as f:
        del f["graphs/onnx"]
    with pytest.raises(pr.BundleFormatError, match=r"no onnx graph for diffraction_to_obj.*Add graphs with: "
                                                   r"ptycho-export"):
        pr.load_bundle(path, backend="onnx")
    try:
        import torch  # noqa: F401
    except ImportError:  # auto falls back to TorchScript, which needs torch
        with pytest.raises(ImportError, match=r"pip install 'ptycho-runtime\[torch\]'"):
            pr.load_bundle(path)
    else:
        b = pr.load_bundle(path)
        assert b.backend == "torchscript"
        _still_works(b)
    _still_works(bundles["n64_g1"])


def test_checksum_damage(bundle_path, bundles):
    path = bundle_path("n64_g1")
    with h5py.File(path, "r+") as f:
        ds = f["graphs/onnx/diffraction_to_obj/bytes"]
        ds[100] = np.uint8((int(ds[100]) + 1) % 256)  # one flipped byte, checksum attribute left alone
    with pytest.raises(pr.BundleChecksumError, match=r"Checksum mismatch in /graphs/onnx/diffraction_to_obj/bytes"):
        pr.load_bundle(path)
    _still_works(bundles["n64_g1"])


def test_not_a_bundle(tmp_path, bundle_path):
    scan = bundle_path("n64_g1").parent / "scan.npz"
    with pytest.raises(pr.BundleFormatError, match="not a ptycho-export bundle"):
        pr.load_bundle(scan)
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(pr.BundleFormatError, match="not an HDF5 file"):
        pr.load_bundle(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(pr.BundleFormatError, match="HDF5 file but not a ptycho-export bundle"):
        pr.load_bundle(other)
    with pytest.raises(FileNotFoundError, match="No bundle at"):
        pr.load_bundle(tmp_path / "missing.h5")
    with pytest.raises(FileNotFoundError, match="a folder that contains wts.h5"):
        pr.load_bundle(tmp_path)  # a folder without wts.h5


# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize("name", NAMES)
def test_threads_share_one_bundle(bundles, name):
    b = bundles[name]
    x, _ = _eager_parity(b)
    scan, pos = _scan(b.path)
    d = scan["diffraction"][:24]
    p = pos[:24]
    x = np.concatenate([x] * 3)  # 9 parity frames: the 4 inputs differ in length (9, 8, 7, 6)
    inputs = [x[i:] for i in range(4)]
    seq_predict = [b.predict(xi, batch_size=3) for xi in inputs]
    seq_recon = b.reconstruct(d, p, batch_size=5)
    results: dict = {}
    errors: list = []
    barrier = threading.Barrier(4)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for rep in range(3):
                results[(t, rep)] = b.predict(inputs[(t + rep) % 4], batch_size=3)
            results[(t, "recon")] = b.reconstruct(d, p, batch_size=5)
        except BaseException as exc:  # noqa: BLE001 - pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for t in range(4):
        for rep in range(3):
            np.testing.assert_array_equal(results[(t, rep)], seq_predict[(t + rep) % 4])
        np.testing.assert_array_equal(results[(t, "recon")].object, seq_recon.object)


def test_a_refined_reconstruction_starts_from_a_cover_of_the_frames_and_records_it(bundles, caplog):
    """gridsize 2 + refine: the network predicts a cover (fewer groups), the record says so, "all" is still there."""
    import logging

    from ptycho_runtime.inference.scan_refinement import RefineSettings

    b = bundles["n64_g2"]
    scan, pos = _scan(b.path)
    n = pos.shape[0]
    caplog.set_level(logging.INFO, logger="ptycho_runtime")
    runs = {}
    for rule in ("cover", "all"):
        settings = RefineSettings(sweeps=2, start_groups=rule, amplitude_prior="none", refine_probe=False)
        runs[rule] = b.reconstruct(scan["diffraction"], pos, refine=settings, probe=scan["probeGuess"])
    cover, every = (runs[k].refinement["network_groups"] for k in ("cover", "all"))
    assert every == {"rule": "all", "groups": n, "frames": n}
    assert cover["rule"] == "cover" and cover["frames"] == n and cover["groups"] < 0.6 * n
    assert any(f"reconstructed {cover['groups']} frame group(s)" in r.getMessage() for r in caplog.records)
    assert RefineSettings().start_groups == "cover"  # the default the record above exercises
    # every frame is still in the start, so the same pixels are refined (the refined objects' equality is measured
    # on real scans in docs/fidelity.md; this fixture's network is not trained to fit its frames)
    np.testing.assert_array_equal(runs["cover"].covered, runs["all"].covered)
    # the network alone predicts all groups, and an explicit groups= wins
    assert b.reconstruct(scan["diffraction"], pos, groups="cover").covered.sum() <= b.reconstruct(
        scan["diffraction"], pos).covered.sum()
    with pytest.raises(ValueError, match="groups must be one of all, cover"):
        b.reconstruct(scan["diffraction"], pos, groups="half")
    with pytest.raises(ValueError, match="refine start_groups must be one of all, cover"):
        RefineSettings(start_groups="half")
