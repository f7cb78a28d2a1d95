"""The ``ptycho-export`` command line, end to end on real tiny bundles."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx import numpy_helper  # noqa: E402

from ptycho_export import cli, export  # noqa: E402
from ptycho_export.verify import verify_bundle  # noqa: E402
from ptycho_runtime import format as fmt  # noqa: E402
from ptycho_runtime.reconstruction.stitching import Reconstruction  # noqa: E402

GRAPHS = {"onnx/autoencoder", "onnx/diffraction_to_obj", "torchscript/autoencoder", "torchscript/diffraction_to_obj"}




def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("ptycho-export: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def strip_graphs(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        for group in ("graphs", "parity"):
            if group in f:
                del f[group]


def perturb_onnx_conv(path: Path, model: str = "diffraction_to_obj", factor: float = 1.5) -> None:
    """Scale one Conv weight of a stored ONNX graph and store it back with valid checksums."""
    with h5py.File(path, "r+") as f:
        group = f["graphs"]["onnx"][model]
        proto = onnx.load_from_string(group["bytes"][()].tobytes())
        conv = next(n for n in proto.graph.node if n.op_type == "Conv")
        init = next(i for i in proto.graph.initializer if i.name == conv.input[1])
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
        data = proto.SerializeToString()
        meta = json.loads(group["metadata_json"][()].decode())
        meta["sha256"] = hashlib.sha256(data).hexdigest()
        fmt.write_payload(group, "bytes", data)
        fmt.write_json(group, "metadata_json", meta)


# --------------------------------------------------------------------------- bundle (default command)


def test_default_command_adds_graphs_prints_table_and_is_idempotent(make_bundle, capsys):
    path = make_bundle()
    strip_graphs(path)
    assert fmt.read_bundle(path).graphs == {}

    code, out, err = run_cli(capsys, path)
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in GRAPHS}
    assert set(rows) == GRAPHS
    assert all(line.rstrip().endswith("refreshed") for line in rows.values())
    assert "size MiB" in out and "max rel err vs eager" in out and "export s" in out
    for line in rows.values():  # size and parity columns hold real numbers
        cols = line.split()
        size, rel = float(cols[-4]), float(cols[-3])
        assert 1.0 < size < 20.0 and 0.0 <= rel <= 1e-4, line
    contents = fmt.read_bundle(path)
    assert {f"{k}/{m}" for k, m in contents.graphs} == GRAPHS
    assert contents.graph("onnx", "diffraction_to_obj").metadata["opset"] == 20

    before = path.read_bytes()
    code, out, _ = run_cli(capsys, "bundle", path.parent)  # explicit alias, folder form
    assert code == 0
    assert "Nothing to do" in out and out.count(" kept") == 4
    assert path.read_bytes() == before


def test_bundle_usage_errors(make_bundle, capsys, tmp_path):
    code, _, err = run_cli(capsys, "bundle", tmp_path / "x.h5", "--no-torchscript", "--no-onnx")
    assert code == 2
    assert_one_line_error(err, "nothing to compile")
    code, _, err = run_cli(capsys, tmp_path / "x.h5", "--opset", "12")
    assert code == 2
    assert_one_line_error(err, "--opset 12")
    assert cli.DEFAULT_OPSET == export.DEFAULT_OPSET and cli.PARITY_TOLERANCE == export.PARITY_TOLERANCE


# --------------------------------------------------------------------------- inspect


def test_inspect_text_and_json(make_bundle, capsys):
    path = make_bundle()
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0
    assert "ptycho-export-bundle v2" in out
    assert "N=64" in out and "gridsize=1" in out and "n_filters_scale=1" in out
    for name in GRAPHS:
        assert name in out
    assert "Training  1 epoch(s)" in out

    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["format"] == "ptycho-export-bundle" and info["format_version"] == 2
    assert info["producer"].startswith("ptycho-export")
    assert "torch" in info["versions"]
    assert info["params"]["N"] == 64 and info["params"]["gridsize"] == 1
    assert info["params"]["output_mode"] == "amp_phase"
    assert info["params"]["intensity_scale"] == pytest.approx(math.sqrt(1e9) / 32, rel=0.05)
    assert set(info["graphs"]) == GRAPHS
    g = info["graphs"]["onnx/diffraction_to_obj"]
    assert g["opset"] == 20 and g["method"] == "torch.export" and g["parity_passed"] is True
    assert g["size_bytes"] == len(fmt.read_bundle(path).graph("onnx", "diffraction_to_obj").data)
    with h5py.File(path, "r") as f:
        n_ae = int(f["models/autoencoder"].attrs["n_parameters"])
    assert info["models"]["autoencoder"]["n_parameters"] == n_ae > 100_000
    assert info["models"]["diffraction_to_obj"]["class"] == "DiffractionToObject"
    t = info["training"]
    assert t["epochs"] == 1 and t["first_loss"] == t["last_loss"] == t["best_loss"] > 0
    assert t["last_val_loss"] > 0 and t["wall_time_s"] > 0
    assert info["parity_cases"] == {"b1": 1, "b3": 3}


# --------------------------------------------------------------------------- verify


def test_verify_passes_on_a_good_bundle(make_bundle, capsys, monkeypatch):
    path = make_bundle()
    code, out, err = run_cli(capsys, "verify", path, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] is True and report["status"] == "ok" and report["checksum"]["ok"] is True
    assert report["cases"] == {"b1": 1, "b3": 3}
    pairs = {(r["backend"], r["graph"]) for r in report["results"]}
    assert pairs >= {(b, m) for b in ("eager", "torchscript", "onnxruntime-cpu") for m in fmt.MODEL_NAMES}
    for r in report["results"]:
        assert r["passed"] and r["error"] is None and 0 <= r["max_rel"] <= r["tolerance_rel"]
        assert r["tolerance_rel"] == (1e-5 if r["backend"] == "eager" else 1e-4)
        per_case = (2 if r["graph"] == "diffraction_to_obj" else 3) + (2 if r["backend"] == "eager" else 0)
        assert r["n_compared"] == 2 * per_case  # two cases × every output stored for the graph
    cuda = report["backends"]["onnxruntime-cuda"]
    assert cuda["available"] or cuda["reason"]

    # the human-readable table renders the same report (reused here: verifying again costs seconds)
    import ptycho_export.verify

    monkeypatch.setattr(ptycho_export.verify, "verify_bundle", lambda *a, **k: report)
    code, out, _ = run_cli(capsys, "verify", path)
    assert code == 0
    assert "PASSED" in out and "Checksums ok" in out
    lines = out.splitlines()
    for backend in ("eager", "torchscript", "onnxruntime-cpu"):
        rows = [line for line in lines if line.startswith(backend + " ")]
        assert len(rows) == 2 and all(line.rstrip().endswith("pass") for line in rows), out
    assert all("1.00e-05" in line for line in lines if line.startswith("eager "))


def test_verify_catches_a_perturbed_onnx_graph_as_parity_failure(make_bundle, capsys):
    path = make_bundle()
    perturb_onnx_conv(path)
    fmt.read_bundle(path)  # checksums still valid: this is a wrong graph, not a damaged file

    code, out, err = run_cli(capsys, "verify", path, "--json")
    assert code == 3
    assert_one_line_error(err, "parity mismatch", "onnxruntime-cpu/diffraction_to_obj")
    report = json.loads(out)
    assert report["checksum"]["ok"] is True and report["status"] == "parity_mismatch"
    rows = {(r["backend"], r["graph"]): r for r in report["results"]}
    bad = rows[("onnxruntime-cpu", "diffraction_to_obj")]
    assert bad["passed"] is False and bad["max_rel"] > 1e-2 and bad["error"] is None
    assert [key for key, r in rows.items() if not r["passed"]] == [("onnxruntime-cpu", "diffraction_to_obj")]

    code, out, err = run_cli(capsys, "verify", path, "--backend", "onnxruntime-cpu")
    assert code == 3 and "FAIL" in out and "PARITY MISMATCH" in out


def test_verify_uses_onnxruntime_cuda_only_when_a_session_really_runs_on_it(make_bundle, monkeypatch):
    import onnxruntime as ort

    path = make_bundle()
    report = verify_bundle(path, backends=["onnxruntime-cuda"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert report["backends"]["onnxruntime-cuda"]["available"] is False
        assert "no CUDAExecutionProvider" in report["backends"]["onnxruntime-cuda"]["reason"]
        assert report["results"] == [] and report["status"] == "nothing_verified"
    # offered by the build, but the session falls back to the CPU: skipped, never reported as a CUDA pass
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort.InferenceSession, "get_providers", lambda self: ["CPUExecutionProvider"])
    report = verify_bundle(path, backends=["onnxruntime-cuda", "onnxruntime-cpu"])
    cuda = report["backends"]["onnxruntime-cuda"]
    assert cuda["available"] is False and "not on CUDAExecutionProvider" in cuda["reason"]
    assert {r["backend"] for r in report["results"]} == {"onnxruntime-cpu"} and report["passed"] is True


def test_verify_reports_flipped_bytes_as_checksum_failure(make_bundle, capsys):
    path = make_bundle()
    with h5py.File(path, "r+") as f:
        ds = f["graphs/onnx/diffraction_to_obj/bytes"]
        ds[1000] = ds[1000] ^ 0xFF  # no checksum update

    report = verify_bundle(path)
    assert report["checksum"]["ok"] is False and report["status"] == "checksum_failure"
    assert "/graphs/onnx/diffraction_to_obj/bytes" in report["checksum"]["error"]
    assert report["passed"] is False and report["results"] == []

    code, out, err = run_cli(capsys, "verify", path)
    assert code == 4
    assert "FAILED" in out
    assert_one_line_error(err, "checksum")
    code, _, err = run_cli(capsys, "inspect", path)  # any command that reads the bundle: exit 4
    assert code == 4
    assert_one_line_error(err, "Checksum mismatch")


# --------------------------------------------------------------------------- bad input → exit 2


def test_bad_inputs_exit_2_with_one_clear_line(make_bundle, capsys, tmp_path):
    missing = tmp_path / "missing.h5"
    for argv in ([missing], ["inspect", missing], ["verify", missing]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2
        assert_one_line_error(err, "No bundle at", "missing.h5")

    text = tmp_path / "notes.h5"
    text.write_text("not a bundle\n")
    for argv in ([text], ["inspect", text], ["verify", text]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2
        assert_one_line_error(err, "not an HDF5 file")

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    code, _, err = run_cli(capsys, "inspect", other)
    assert code == 2
    assert_one_line_error(err, "not a ptycho-export bundle")

    path = make_bundle()
    with h5py.File(path, "r+") as f:
        del f["models"]
    code, _, err = run_cli(capsys, path, "--force")
    assert code == 2
    assert_one_line_error(err, "no eager weights")
    code, out, _ = run_cli(capsys, "inspect", path)  # still inspectable
    assert code == 0 and "none (no eager weights)" in out

    code, _, err = run_cli(capsys, "verify")
    assert code == 2 and "required" in err
    code, _, err = run_cli(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--debug", "inspect", tmp_path / "missing.h5")
    assert code == 2
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("ptycho-export: error:")


def test_help_documents_exit_codes(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for line in ("0  success", "1  unexpected error", "2  usage error", "3  parity mismatch", "4  checksum failure"):
        assert line in out


def test_console_script_entry_point(make_bundle):
    path = make_bundle()
    script = Path(sys.executable).parent / "ptycho-export"
    assert script.exists(), f"console script not installed at {script}"
    proc = subprocess.run([str(script), "inspect", str(path), "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["params"]["N"] == 64 and set(info["graphs"]) == GRAPHS
    proc = subprocess.run([str(script), str(path.parent / "nope.h5")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("ptycho-export: error: No bundle at")


# --------------------------------------------------------------------------- train


def test_train_simulated_writes_bundle_figure_history_and_report(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--simulate", "lines", "--epochs", "1", "--n-filters-scale", "1",
                             "--no-graphs", "--n-positions", "24", "--batch-size", "8", "--output-dir", out_dir,
                             "--photon-energy-ev", "8800", "--detector-distance-m", "2", "--detector-pixel-size-m",
                             "75e-6")
    assert code == 0, err
    for name in ("wts.h5", "reconstruction.png", "history.json", "report.md"):
        assert (out_dir / name).is_file(), name
    contents = fmt.read_bundle(out_dir / "wts.h5")
    assert contents.params["N"] == 64 and contents.params["n_filters_scale"] == 1
    assert contents.graphs == {}  # --no-graphs
    # the instrument, for the runtime's host checks
    assert contents.physics == {"photon_energy_eV": 8800.0, "detector_distance_m": 2.0, "detector_pixel_size_m": 75e-6}

    history = json.loads((out_dir / "history.json").read_text())
    assert history["epochs"] == 1 and len(history["loss"]) == 1 and len(history["val_loss"]) == 1
    assert math.isfinite(history["loss"][0]) and history["loss"][0] > 0
    np.testing.assert_allclose(history["loss"], contents.history["loss"])

    import matplotlib.image

    png = matplotlib.image.imread(out_dir / "reconstruction.png")
    assert png.ndim == 3 and png.shape[1] > 1.5 * png.shape[0]  # two panels side by side
    assert png[..., :3].std() > 0.05  # not a blank figure

    report = (out_dir / "report.md").read_text()
    assert "18 train / 6 test" in report and "N=64" in report and "1 epoch(s)" in report
    assert "Final losses" in report and "Wall time" in report
    assert "amplitude PSNR (dB)" in report and "Removed global phase offset" in report
    cells = _report_cells(report)
    assert int(cells["scored pixels"]) > 1000
    assert all(math.isfinite(float(cells[label])) for label in ("phase SSIM", "amplitude PSNR (dB)",
                                                                "phase RMSE (rad)"))
    assert "Quality vs ground truth" in out


def _report_cells(report: str) -> dict[str, str]:
    """report.md's quality table as {metric: cell}."""
    rows = [line.strip().strip("|").split("|") for line in report.splitlines() if line.startswith("| ")]
    return {label.strip(): value.strip() for label, value in rows if label.strip() != "metric"}


def test_train_fraction_one_without_test_data_trains_and_writes_the_report(tmp_path, capsys):
    """No held-out scan: no reconstruction and no score, but the run finishes and says why (was: crash on test.n)."""
    out_dir = tmp_path / "all"
    code, out, err = run_cli(capsys, "train", "--simulate", "lines", "--epochs", "1", "--n-filters-scale", "1",
                             "--no-graphs", "--n-positions", "24", "--batch-size", "8", "--train-fraction", "1",
                             "--output-dir", out_dir)
    assert code == 0, err
    report = (out_dir / "report.md").read_text()
    assert "24 train / 0 test" in report and "No held-out scan" in report
    assert not (out_dir / "reconstruction.png").exists() and not (out_dir / "test_scan.npz").exists()
    assert (out_dir / "wts.h5").is_file() and (out_dir / "history.json").is_file()
    assert "Quality vs ground truth" not in out


def test_train_report_scores_the_test_region_as_evaluate_does(tmp_path):
    """One scoring: report.md and the run's result hold the numbers ``evaluate`` gives for the same bundle and scan."""
    from ptycho_export.cli import TrainOptions, train
    from ptycho_export.cli.output import METRIC_ROWS
    from ptycho_export.evaluate import evaluate

    lines: list[str] = []
    result = train(TrainOptions(output_dir=tmp_path / "run", simulate="lines", epochs=1, n_filters_scale=1,
                                n_positions=24, batch_size=8), echo=lines.append)
    assert lines[0].startswith("Training on simulated") and result.graph_error is None
    assert result.export_summary is not None and result.scored is not None
    ev = evaluate(result.bundle_path, tmp_path / "run" / "test_scan.npz")
    ours, theirs = result.scored.metrics, ev.network.metrics
    assert ours["n_pixels"] == theirs["n_pixels"]
    for _, key, _ in METRIC_ROWS:  # eager vs ONNX: equal up to the graphs' parity tolerance
        assert ours[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-4), key
    assert result.scored.alignment.phase_offset_rad == pytest.approx(ev.network.alignment.phase_offset_rad, abs=1e-3)
    cells = _report_cells(result.report_path.read_text())
    for label, key, cell_format in METRIC_ROWS:
        assert float(cells[label]) == pytest.approx(theirs[key], abs=1.01 * 10 ** -int(cell_format[-3])), label


def test_train_rejects_a_bad_npz(tmp_path, capsys):
    bad = tmp_path / "scan.npz"
    bad.write_bytes(b"definitely not a zip archive")
    code, _, err = run_cli(capsys, "train", "--data", bad, "--output-dir", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, "--data", "not an NPZ file")
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, "train", "--simulate", "grf", "--N", "48", "--output-dir", tmp_path / "o")
    assert code == 2
    assert_one_line_error(err, "N must be one of")
    code, _, err = run_cli(capsys, "train", "--product", tmp_path / "p.h5", "--output-dir", tmp_path / "o")
    assert code == 2
    assert_one_line_error(err, "--product and --patterns go together")
    code, _, err = run_cli(capsys, "train", "--simulate", "grf", "--photon-energy-ev", "-1", "--output-dir",
                           tmp_path / "o")
    assert code == 2
    assert_one_line_error(err, "--photon-energy-ev must be > 0")


# --------------------------------------------------------------------------- the scoring's frame


def test_scoring_frame_matches_the_simulator_and_stitcher():
    """Stitching the simulator's true patches and scoring them against its object must score near-perfect."""
    from ptycho_export.data import simulate_scan
    from ptycho_export.evaluate import score_reconstruction
    from ptycho_export.stitching import stitch_patches

    scan = simulate_scan(N=64, scan="random", n_positions=30, seed=3)
    positions = np.stack([scan.xcoords, scan.ycoords], axis=-1)
    recon = stitch_patches(scan.patches, positions)
    m = score_reconstruction("truth", recon, scan.object, positions, scan.probe, 0.0, register=False).metrics
    assert m["amplitude_ssim"] > 0.98 and m["phase_ssim"] > 0.98 and m["amplitude_psnr_db"] > 30
    # one pixel off in x, not registered back: clearly worse, so the test above really checks the frame
    shifted = Reconstruction(recon.object, recon.weight, recon.x_coords + 1, recon.y_coords)
    m1 = score_reconstruction("shifted", shifted, scan.object, positions, scan.probe, 0.0, register=False).metrics
    assert m1["amplitude_psnr_db"] < m["amplitude_psnr_db"] - 3
    far = Reconstruction(recon.object, recon.weight, recon.x_coords + 5000, recon.y_coords)
    with pytest.raises(ValueError, match="no reconstructed pixel"):
        score_reconstruction("far", far, scan.object, positions, scan.probe, 0.0)
