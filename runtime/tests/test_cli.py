"""``ptycho-runtime`` CLI: infer output, PNG, info, exit codes, the installed console script."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import ptycho_runtime as pr
from ptycho_runtime import cli
from ptycho_runtime.files.npz import normalization_factor, read_npz_arrays
from ptycho_runtime.inference.scan_refinement import RefineSettings, choose_start
from ptycho_runtime.refinement.engine import prepare_backend

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eager_tol(ref) -> float:
    """1e-4 of the output's scale: float32 agreement with eager (as the parity checks define it)."""
    return 1e-4 * max(1.0, float(np.abs(np.asarray(ref)).max()))



def _reference(bundle_file: Path, scan_file: Path, diffraction=None):
    scan = read_npz_arrays(scan_file)
    pos = np.stack([scan["xcoords"], scan["ycoords"]], axis=1)
    b = pr.load_bundle(bundle_file)
    return b, pos, b.reconstruct(scan["diffraction"] if diffraction is None else diffraction, pos)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ptycho-runtime: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("name", ["n64_g1", "n64_g2"])
def test_infer_writes_reconstruction_equal_to_bundle_reconstruct(bundle_path, tmp_path, capsys, name):
    path = bundle_path(name)
    scan_file = path.parent / "scan.npz"
    out = tmp_path / "sub" / "recon.h5"
    rc = cli.main(["infer", str(path), str(scan_file), "-o", str(out), "--batch-size", "7", "--no-refine"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("reconstructed 48 patterns in ") and "patterns/s) on CPUExecutionProvider" in last
    assert last.endswith("network only (no refinement)")
    b, pos, ref = _reference(path, scan_file)
    assert sorted(p.name for p in out.parent.iterdir()) == ["recon.h5"]  # no temp file left
    with h5py.File(out, "r") as f:
        for key in ("object", "amplitude", "phase", "weight", "x_coords", "y_coords", "positions", "probe"):
            assert key in f, key
        assert f["object"].dtype == np.complex64
        np.testing.assert_allclose(f["object"][()], ref.object, rtol=0, atol=1e-6)
        np.testing.assert_allclose(f["weight"][()], ref.weight, rtol=0, atol=1e-9)
        np.testing.assert_allclose(f["amplitude"][()], np.abs(f["object"][()]), atol=1e-6)
        np.testing.assert_allclose(f["phase"][()], np.angle(f["object"][()]), atol=1e-6)
        np.testing.assert_array_equal(f["x_coords"][()], ref.x_coords)
        np.testing.assert_array_equal(f["y_coords"][()], ref.y_coords)
        np.testing.assert_array_equal(f["positions"][()], pos)
        np.testing.assert_array_equal(f["probe"][()], b.probe)
        assert f["probe"].attrs["source"].startswith("the bundle's training probe") and not f.attrs["refined"]
        np.testing.assert_array_equal(f["params/probe"][()], b.probe)
        params = json.loads(f.attrs["params_json"])
        assert params["N"] == 64 and params["gridsize"] == b.gridsize and "probe" not in params
        assert params["intensity_scale"] == pytest.approx(b.intensity_scale)
        assert f.attrs["backend"] == "onnx"
        assert json.loads(f.attrs["providers"]) == ["CPUExecutionProvider"]
        assert Path(f.attrs["bundle_path"]) == path.resolve()
        assert f.attrs["patterns_per_second"] > 0


def test_infer_refines_by_default_with_the_scans_probe(bundle_path, tmp_path, capsys):
    """The default infer refines against the scan with its probeGuess, and the file says what ran and whose probe."""
    from ptycho_runtime.refinement import DEFAULT_SWEEPS, far_field_misfit

    path = bundle_path("n64_g1")
    scan_file = path.parent / "scan.npz"
    out = tmp_path / "recon.h5"
    assert cli.main(["infer", str(path), str(scan_file), "-o", str(out)]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    b, pos, network = _reference(path, scan_file)
    scan = read_npz_arrays(scan_file)
    with h5py.File(out, "r") as f:
        assert f.attrs["refined"]
        record = json.loads(f.attrs["refinement_json"])
        obj, probe = f["object"][()], f["probe"][()]
        source = f["probe"].attrs["source"]
        np.testing.assert_array_equal(f["params/probe"][()], b.probe)
    # the default sweeps, and more only where the probe was refined and the fit stayed far above the noise
    assert record["sweeps_requested"] == DEFAULT_SWEEPS
    assert record["sweeps"] == DEFAULT_SWEEPS + record["sweeps_extended"]
    assert record["probe_updated"] or record["sweeps_extended"] == 0
    coarse = f"{record['coarse_sweeps']} at half resolution, " if record["coarse_sweeps"] else ""
    assert record["backend"] == prepare_backend()  # "auto": numba where it is installed, else numpy
    assert f"including {record['sweeps']} refinement sweeps ({record['backend']}, {coarse}start: " in last
    assert "probe: the host's probe" in last
    assert record["engine"] == "builtin" and record["batching"] == "sparse"
    # the default "auto" rule: the scan's probe is kept unless refining it, after a fit far above the noise, fits better
    assert record["probe_rule"] == "auto" and record["probe_updated"] is (
        "fixed_misfit_over_floor" in record and record["misfit_over_floor"] < record["fixed_misfit_over_floor"])
    assert record["positions_refined"] is False and (record["noise_floor"] is None or record["noise_floor"] > 0)
    assert record["amplitude_prior"]["rule"] == "tv"  # the default; applied where the lit pixels set a weight
    assert set(record["start_misfit"]) == {"network phase", "flat"}  # start="auto": both tried
    # the best fit after the trial sweeps is kept, flat only when clearly better (FLAT_MARGIN)
    assert record["start"] == choose_start(record["start_misfit"])
    # the file holds the probe the object goes with: the scan's (data units), not the bundle's; refined or not, as
    # the rule decided on this small scan (whose fit stays far above the noise even with its exact probe)
    if record["probe_updated"]:
        assert source == record["probe_source"] == "the host's probe, refined"
        guess = scan["probeGuess"].ravel()
        overlap = abs(np.vdot(probe.ravel(), guess)) / (np.linalg.norm(probe) * np.linalg.norm(guess))
        assert 0.9 < overlap < 1 - 1e-6  # refined from the scan's guess, and changed
    else:
        assert source == record["probe_source"] == "the host's probe"
        np.testing.assert_allclose(probe, scan["probeGuess"], rtol=1e-6)
    starts = pos - (64 - 1) / 2 - np.array([network.x_coords[0], network.y_coords[0]])
    amp = scan["diffraction"]
    assert far_field_misfit(obj, amp, probe, starts) < 0.5 * far_field_misfit(
        np.where(network.covered, network.object, 1), amp, probe, starts)


def test_infer_warns_on_a_foreign_probe_and_refuses_the_network_alone(bundle_path, tmp_path, capsys):
    """A scan whose probe is not the bundle's: loud warnings; --no-refine refused unless --accept-mismatch."""
    path = bundle_path("n64_g1")
    scan = dict(np.load(path.parent / "scan.npz"))
    N = scan["probeGuess"].shape[0]
    yy, xx = np.mgrid[:N, :N] - (N - 1) / 2
    scan["probeGuess"] = (np.abs(scan["probeGuess"]) * np.exp(1j * 0.05 * (xx**2 + yy**2))).astype(np.complex64)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, **scan)
    out = tmp_path / "r.h5"
    assert cli.main(["infer", str(path), str(foreign), "-o", str(out), "--no-refine"]) == 2
    err = capsys.readouterr().err
    assert "WARNING: the host's probe matches the bundle's to" in err and "--accept-mismatch" in err
    assert not out.exists()
    assert cli.main(["infer", str(path), str(foreign), "-o", str(out), "--no-refine", "--accept-mismatch"]) == 0
    assert cli.main(["infer", str(path), str(foreign), "-o", str(out)]) == 0  # refinement on: warned, then corrected
    err = capsys.readouterr().err
    assert "WARNING: the host's probe" in err and "refinement sweeps" in err
    with h5py.File(out, "r") as f:
        mismatches = json.loads(f.attrs["notes_json"])["mismatches"]
        assert f.attrs["refined"] and "matches the bundle's to" in " ".join(mismatches)


def test_infer_png(bundle_path, tmp_path):
    pytest.importorskip("matplotlib")
    path = bundle_path("n64_g1")
    png = tmp_path / "recon.png"
    rc = cli.main(["infer", str(path), str(path.parent / "scan.npz"), "-o", str(tmp_path / "r.h5"),
                   "--png", str(png)])
    assert rc == 0
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_png_leaves_the_hosts_matplotlib_alone(bundle_path, tmp_path):
    """write_png draws on its own Figure + Agg canvas: no pyplot import, no matplotlib.use() in the host process."""
    pytest.importorskip("matplotlib")
    path = bundle_path("n64_g1")
    code = textwrap.dedent(f"""
        import sys
        import matplotlib
        matplotlib.use("svg")  # the host's choice
        import ptycho_runtime as pr
        from ptycho_runtime.files import write_png
        b = pr.load_bundle({str(path)!r})
        from ptycho_runtime.files.npz import read_npz_arrays
        s = read_npz_arrays({str(path.parent / "scan.npz")!r})
        import numpy as np
        recon = b.reconstruct(s["diffraction"], np.stack([s["xcoords"], s["ycoords"]], 1), counts=False)
        write_png(__import__("pathlib").Path({str(tmp_path / "r.png")!r}), recon, "t")
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["svg", "False"]
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC


def test_png_without_matplotlib_exits_2_before_inference(bundle_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = bundle_path("n64_g1")
    out = tmp_path / "r.h5"
    rc = cli.main(["infer", str(path), str(path.parent / "scan.npz"), "-o", str(out), "--png", str(tmp_path / "r.png")])
    assert rc == 2 and not out.exists()
    assert "pip install 'ptycho-runtime[png]'" in _one_error_line(capsys.readouterr().err)


def test_infer_counts(bundle_path, tmp_path):
    path = bundle_path("n64_g1")
    scan = dict(np.load(path.parent / "scan.npz"))
    counts_file = tmp_path / "counts.npz"
    np.savez(counts_file, **{**scan, "diffraction": (scan["diffraction"].astype(np.float64) * 37.0) ** 2})
    out = tmp_path / "r.h5"
    assert cli.main(["infer", str(path), str(counts_file), "-o", str(out), "--counts", "--no-refine",
                     "--accept-mismatch"]) == 0  # the fixture bundle was trained at 1e9 photons
    d = scan["diffraction"].astype(np.float64)
    _, _, ref = _reference(path, path.parent / "scan.npz", (d * normalization_factor(d)).astype(np.float32))
    with h5py.File(out, "r") as f:
        np.testing.assert_allclose(f["object"][()], ref.object, rtol=0, atol=_eager_tol(ref.object))


def test_info_json_and_text(bundle_path, capsys):
    path = bundle_path("n64_g2")
    assert cli.main(["info", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["format_version"], report["N"], report["gridsize"]) == (2, 64, 2)
    assert report["output_mode"] == "amp_phase" and report["intensity_scale"] > 0
    graphs = {(g["kind"], g["model"]): g for g in report["graphs"]}
    g = graphs[("onnx", "diffraction_to_obj")]
    assert g["size_bytes"] > 0 and 0 <= g["parity_max_rel"] < 1e-4 and g["parity_passed"] is True
    assert "CPUExecutionProvider" in report["runtime"]["available_providers"]
    assert report["runtime"]["onnxruntime_version"]
    b = pr.load_bundle(path)
    assert report["nphotons"] == pytest.approx(b.params["nphotons"])  # what infer compares a scan's counts with
    probe = report["probe"]
    assert probe["shape"] == [64, 64] and probe["energy"] == pytest.approx(float(np.sum(np.abs(b.probe) ** 2)))
    assert 0 < probe["diameter_90_px"] <= 64 * 2**0.5 and all(0 <= c < 64 for c in probe["centre_px"])
    assert report["default_load"] == {"backend": "onnx", "device": "cpu", "precision": "fp32",
                                      "providers": ["CPUExecutionProvider"]}
    assert cli.main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "gridsize         2" in text and "onnx/diffraction_to_obj" in text
    assert "default load     backend=onnx" in text
    assert "training probe   64x64, sum |P|^2" in text and "nphotons" in text


def test_info_reports_a_bundle_it_cannot_run(bundle_path, capsys, monkeypatch):
    path = bundle_path("n64_g1")
    with h5py.File(path, "r+") as f:
        del f["graphs/onnx"]
    monkeypatch.setitem(sys.modules, "torch", None)
    assert cli.main(["info", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "needs torch" in report["default_load"]["error"]
    assert [(g["kind"], g["model"]) for g in report["graphs"]][0][0] == "torchscript"


@pytest.mark.parametrize("case", ["missing_bundle", "not_a_bundle", "bad_npz", "missing_scan", "wrong_N",
                                  "batch_size_0", "no_onnx_graph"])
def test_bad_input_exits_2_with_one_line(bundle_path, tmp_path, capsys, case):
    path = bundle_path("n64_g1")
    scan = path.parent / "scan.npz"
    bundle_arg, scan_arg, extra, expect = str(path), str(scan), [], ""
    if case == "missing_bundle":
        bundle_arg, expect = str(tmp_path / "nope.h5"), "No bundle at"
    elif case == "not_a_bundle":
        bundle_arg, expect = str(scan), "not a ptycho-export bundle"
    elif case == "bad_npz":
        bad = tmp_path / "bad.npz"
        bad.write_text("not an npz\n")
        scan_arg, expect = str(bad), "not an NPZ file"
    elif case == "missing_scan":
        scan_arg, expect = str(tmp_path / "nope.npz"), "does not exist"
    elif case == "wrong_N":
        small = tmp_path / "small.npz"
        np.savez(small, diffraction=np.random.default_rng(0).uniform(0, 1, (4, 32, 32)).astype(np.float32),
                 xcoords=np.arange(4.0) + 40,
                 ycoords=np.arange(4.0) + 40, probeGuess=np.ones((32, 32), np.complex64))
        scan_arg, expect = str(small), "trained with N=64"
    elif case == "batch_size_0":
        extra, expect = ["--batch-size", "0"], "--batch-size must be >= 1"
    elif case == "no_onnx_graph":
        with h5py.File(path, "r+") as f:
            del f["graphs/onnx"]
        extra, expect = ["--backend", "onnx"], "Add graphs with"
    out = tmp_path / "r.h5"
    rc = cli.main(["infer", bundle_arg, scan_arg, "-o", str(out), *extra])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and expect in line and not out.exists()
    if case in ("missing_bundle", "not_a_bundle"):
        assert cli.main(["info", bundle_arg]) == 2
        assert expect in _one_error_line(capsys.readouterr().err)


def test_checksum_failure_exits_4(bundle_path, tmp_path, capsys):
    path = bundle_path("n64_g1")
    with h5py.File(path, "r+") as f:
        ds = f["graphs/onnx/diffraction_to_obj/bytes"]
        ds[7] = np.uint8((int(ds[7]) + 1) % 256)
    infer = ["infer", str(path), str(path.parent / "scan.npz"), "-o", str(tmp_path / "r.h5")]
    for argv in (["info", str(path)], infer):
        assert cli.main(argv) == 4
        assert "Checksum mismatch" in _one_error_line(capsys.readouterr().err)


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="a CUDA provider is present")
def test_device_cuda_unavailable_exits_2(bundle_path, tmp_path, capsys):
    path = bundle_path("n64_g1")
    rc = cli.main(["infer", str(path), str(path.parent / "scan.npz"), "-o", str(tmp_path / "r.h5"), "--device", "cuda"])
    assert rc == 2 and "onnxruntime-gpu" in _one_error_line(capsys.readouterr().err)


def test_debug_shows_the_exception(bundle_path, tmp_path):
    with pytest.raises(FileNotFoundError):
        cli.main(["infer", str(tmp_path / "nope.h5"), "x.npz", "-o", str(tmp_path / "r.h5"), "--debug"])


def test_unexpected_error_exits_1(bundle_path, tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    from ptycho_runtime.inference.bundle import Bundle

    monkeypatch.setattr(Bundle, "reconstruct", boom)
    path = bundle_path("n64_g1")
    rc = cli.main(["infer", str(path), str(path.parent / "scan.npz"), "-o", str(tmp_path / "r.h5")])
    assert rc == 1 and "unexpected RuntimeError: kaboom" in _one_error_line(capsys.readouterr().err)


def test_usage_errors_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["infer", "b.h5"])  # missing SCAN and -o
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["infer", "b.h5", "s.npz", "-o", "r.h5", "--backend", "tvm"])
    assert exc.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    helptext = capsys.readouterr().out
    assert "exit codes:" in helptext and "4  checksum failure" in helptext and "2  bad input" in helptext


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_tty_plain_lines_otherwise():
    tty = _Tty()
    p = cli.Progress(10, stream=tty, min_interval_s=0.0)
    for _ in range(5):
        p.update(2)
    p.close("reconstructed 10 patterns")
    out = tty.getvalue()
    assert "\r[" in out and "10/10 patterns 100%" in out and out.endswith("reconstructed 10 patterns\n")
    # a log file or pipe: no carriage returns, one line per tenth of the work, each with rate and ETA
    plain = io.StringIO()
    p = cli.Progress(1000, stream=plain)
    for _ in range(100):
        p.update(10)
    p.close("reconstructed 1000 patterns")
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue() and "[" not in plain.getvalue()
    assert len(lines) == 11 and lines[-1] == "reconstructed 1000 patterns"
    assert lines[0].startswith("100/1000 patterns  10%") and "patterns/s" in lines[0] and "ETA" in lines[0]
    assert lines[9].startswith("1000/1000 patterns 100%")


def _console_script() -> str | None:
    here = Path(sys.executable).parent / ("ptycho-runtime.exe" if os.name == "nt" else "ptycho-runtime")
    return str(here) if here.exists() else shutil.which("ptycho-runtime")


def test_console_script_subprocess(bundle_path, tmp_path):
    exe = _console_script()
    if exe is None:
        pytest.skip("the ptycho-runtime console script is not installed (pip install -e runtime)")
    path = bundle_path("n64_g2")
    out = tmp_path / "r.h5"
    proc = subprocess.run([exe, "infer", str(path), str(path.parent / "scan.npz"), "-o", str(out), "--no-refine"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("reconstructed ")]
    assert len(lines) == 1 and "\r" not in proc.stderr  # stderr is not a TTY: no progress bar
    _, _, ref = _reference(path, path.parent / "scan.npz")
    with h5py.File(out, "r") as f:
        np.testing.assert_allclose(f["object"][()], ref.object, rtol=0, atol=1e-6)
    proc = subprocess.run([exe, "info", str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["gridsize"] == 2
    proc = subprocess.run([exe, "info", str(tmp_path / "missing.h5")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("ptycho-runtime: error: No bundle at")


def test_infer_coarse_sweeps_sets_the_coarse_level_and_the_file_records_it(bundle_path, tmp_path, capsys):
    path = bundle_path("n64_g1")
    scan_file = path.parent / "scan.npz"
    records = {}
    for coarse in ("3", "0"):
        out = tmp_path / f"coarse{coarse}.h5"
        rc = cli.main(["infer", str(path), str(scan_file), "-o", str(out), "--refine", "8", "--refine-probe", "off",
                       "--coarse-sweeps", coarse])
        assert rc == 0, capsys.readouterr().err
        with h5py.File(out, "r") as f:
            records[coarse] = json.loads(f.attrs["refinement_json"])
    assert records["3"]["coarse_sweeps"] == 3 and records["3"]["coarse_factor"] == 2
    assert len(records["3"]["coarse_misfit_per_sweep"]) == 3 and len(records["3"]["misfit_per_sweep"]) == 5
    assert records["0"]["coarse_sweeps"] == 0 and len(records["0"]["misfit_per_sweep"]) == 8
    capsys.readouterr()
    rc = cli.main(["infer", str(path), str(scan_file), "-o", str(tmp_path / "bad.h5"), "--refine", "8",
                   "--coarse-sweeps", "-1"])
    assert rc == 2 and "coarse_sweeps must be an integer >= 0" in capsys.readouterr().err


def test_infer_phase_ramp_every_sets_when_the_ramp_is_fitted_and_the_file_records_it(bundle_path, tmp_path, capsys):
    path = bundle_path("n64_g1")
    scan_file = path.parent / "scan.npz"
    out = tmp_path / "recon.h5"
    rc = cli.main(["infer", str(path), str(scan_file), "-o", str(out), "--refine", "3", "--refine-probe", "off",
                   "--phase-ramp-every", "1"])
    assert rc == 0, capsys.readouterr().err
    with h5py.File(out, "r") as f:
        record = json.loads(f.attrs["refinement_json"])
    assert record["phase_ramp_every"] == 1 and not record["probe_updated"]
    assert [fit["after_sweep"] for fit in record["phase_ramp_fits"]] == [3]  # after the start's two trial sweeps
    capsys.readouterr()
    rc = cli.main(["infer", str(path), str(scan_file), "-o", str(tmp_path / "bad.h5"), "--refine", "3",
                   "--phase-ramp-every", "-1"])
    assert rc == 2 and "phase_ramp_every must be an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad.h5").exists()


def test_infer_refine_runs_the_batched_refinement_from_the_network_object(bundle_path, tmp_path, capsys):
    """--refine N: the written object is Bundle.reconstruct(refine=N) with the scan's own probe, and fits better."""
    from ptycho_runtime.reconstruction.geometry import frame_origin
    from ptycho_runtime.refinement import far_field_misfit

    path = bundle_path("n64_g1")
    scan_file = path.parent / "scan.npz"
    out = tmp_path / "recon.h5"
    rc = cli.main(["infer", str(path), str(scan_file), "-o", str(out), "--refine", "3", "--amplitude-prior", "none"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    b, pos, net = _reference(path, scan_file)
    scan = read_npz_arrays(scan_file)
    expected = b.reconstruct(scan["diffraction"], pos, refine=RefineSettings(sweeps=3, amplitude_prior="none"),
                             probe=scan["probeGuess"])
    with h5py.File(out, "r") as f:
        got = f["object"][()]
        record = json.loads(f.attrs["refinement_json"])
        assert record["sweeps"] == 3 == record["sweeps_requested"]
        assert record["amplitude_prior"] == {"rule": "none"}
    np.testing.assert_allclose(got, expected.object, atol=1e-5)
    starts = frame_origin(pos, b.N) - np.array([net.x_coords[0], net.y_coords[0]])
    filled = np.where(net.covered, net.object, 1)
    assert far_field_misfit(got, scan["diffraction"], scan["probeGuess"], starts) < \
        far_field_misfit(filled, scan["diffraction"], scan["probeGuess"], starts)
    assert cli.main(["infer", str(path), str(scan_file), "-o", str(out), "--refine", "-1"]) == 2
    assert "--refine" in _one_error_line(capsys.readouterr().err)


def test_infer_refines_from_a_cover_of_the_frames_unless_told_all(bundle_path, tmp_path, capsys):
    """gridsize 2: --refine predicts a cover of the frames (the progress counts those groups); --start-groups all."""
    path = bundle_path("n64_g2")
    scan_file = path.parent / "scan.npz"
    n = read_npz_arrays(scan_file)["xcoords"].size
    seen = {}
    for rule in ("cover", "all"):
        out = tmp_path / f"{rule}.h5"
        rc = cli.main(["infer", str(path), str(scan_file), "-o", str(out), "--refine", "2", "--refine-probe", "off",
                       "--start-groups", rule])
        err = capsys.readouterr().err
        assert rc == 0, err
        with h5py.File(out, "r") as f:
            seen[rule] = json.loads(f.attrs["refinement_json"])["network_groups"]
        assert f"{seen[rule]['groups']}/{seen[rule]['groups']} groups 100%" in err
    assert seen["all"] == {"rule": "all", "groups": n, "frames": n}
    assert seen["cover"]["rule"] == "cover" and seen["cover"]["groups"] < 0.6 * n
    with pytest.raises(SystemExit) as exc:
        cli.main(["infer", str(path), str(scan_file), "-o", str(tmp_path / "x.h5"), "--start-groups", "x"])
    assert exc.value.code == 2 and "--start-groups" in capsys.readouterr().err
