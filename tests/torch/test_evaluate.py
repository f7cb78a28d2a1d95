"""``ptycho-export evaluate`` end to end, and the pty-chi reference on simulated scans."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("skimage")

from ptycho_export import cli  # noqa: E402
from ptycho_export.data import load_npz, save_npz  # noqa: E402
from ptycho_export.evaluate import score_reconstruction  # noqa: E402


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def easy_scan(N: int = 32, step: float = 6, phase_scale: float = 0.3, seed: int = 2):
    """A noiseless raster scan (~80% overlap) of a smooth object, phase range ~0.9 rad.

    Returns (amplitudes, positions, probe, object).

    The positions sit at x.5 (frame starts on whole pixels), so the simulation needs no interpolation and
    any error an engine makes is its own.
    """
    from ptycho_export.data.simulate import (
        default_probe,
        extract_patches,
        far_field_amplitude,
        make_object,
        scan_positions,
    )

    base = make_object("grf", 3 * N, seed=seed)
    phase = phase_scale * (np.angle(base) - np.angle(base).mean())
    obj = (np.abs(base) * np.exp(1j * phase)).astype(np.complex64)
    probe = default_probe(N)
    x, y = scan_positions(3 * N, N, "grid", step=step)
    amp = far_field_amplitude(extract_patches(obj, x, y, N), probe)
    return amp, np.stack([x, y], axis=1), probe, obj


def ptychi_available() -> bool:
    from ptycho_export.reference import ReferenceUnavailableError, import_ptychi

    try:
        import_ptychi()
    except ReferenceUnavailableError:
        return False
    return True


needs_ptychi = pytest.mark.skipif(not ptychi_available(), reason="pty-chi not installed (extra 'reference')")


# --------------------------------------------------------------------------- reference (pty-chi)


@needs_ptychi
@pytest.mark.parametrize("algorithm, iterations", [("epie", 80), ("lsqml", 40)])
def test_ptychi_reference_reconstructs_an_easy_scan(algorithm, iterations):
    """Conventions (data scale, DC position, frame centre, position order) right ⇒ pty-chi recovers the object."""
    from ptycho_export.reference import run_reference

    amp, pos, probe, obj = easy_scan()
    res = run_reference(amp, pos, probe, algorithm, iterations=iterations)
    assert res.engine.startswith("pty-chi ") and res.iterations == iterations
    assert len(res.loss) == iterations and res.loss[-1] < 0.01 * res.loss[0]
    s = score_reconstruction("reference", res.reconstruction, obj, pos, probe, res.wall_time_s)
    m = s.metrics
    assert m["phase_ssim"] > 0.8, m
    assert m["amplitude_ssim"] > 0.85, m
    # no half-pixel error: pty-chi's own snapping puts even-N frames 0.5 px off unless the origin is shifted
    assert max(abs(v) for v in s.alignment.shift_px) < 0.1, s.alignment.shift_px
    # the known probe fixes the object's absolute scale: the global amplitude factor the scoring removes is 1
    assert s.alignment.amplitude_scale == pytest.approx(1.0, abs=0.03)


@needs_ptychi
def test_swapped_positions_do_not_reconstruct():
    """The check above can fail: with x and y exchanged the same engine does not recover the object."""
    from ptycho_export.reference import run_reference

    amp, pos, probe, obj = easy_scan()
    rng = np.random.default_rng(0)
    pos = pos + rng.uniform(-2, 2, size=pos.shape)  # break the raster's x/y symmetry
    from ptycho_export.data.simulate import extract_patches, far_field_amplitude

    amp = far_field_amplitude(extract_patches(obj, pos[:, 0], pos[:, 1], 32), probe)
    res = run_reference(amp, pos[:, ::-1], probe, "lsqml", iterations=20)
    m = score_reconstruction("ref", res.reconstruction, obj, pos[:, ::-1], probe, 0.0).metrics
    assert m["phase_ssim"] < 0.5, m


@needs_ptychi
def test_importing_ptychi_leaves_torch_and_sys_modules_as_they_were():
    from ptycho_export.reference import import_ptychi, run_reference

    stub_before = sys.modules.get("torchvision")
    import_ptychi()
    assert sys.modules.get("torchvision") is stub_before  # the stand-in, if one was needed, is gone again
    dtype, device = torch.get_default_dtype(), torch.get_default_device()
    amp, pos, probe, _ = easy_scan()
    run_reference(amp[:9], pos[:9], probe, "lsqml", iterations=1)
    assert torch.get_default_dtype() == dtype and torch.get_default_device() == device


@needs_ptychi
def test_ptychi_engine_seeded_with_the_truth_stays_and_beats_a_flat_start():
    """refine(engine="ptychi") starts from the given object: from the truth it stays there; from flat it is worse."""
    from ptycho_runtime.reconstruction.stitching import StitchCanvas, canvas_bounds
    from ptycho_runtime.refinement.ptychi_engine import run_ptychi

    amp, pos, probe, obj = easy_scan()
    N = probe.shape[0]
    origin, shape = canvas_bounds(pos, N)
    canvas = StitchCanvas(shape, N, origin, window=np.abs(probe) ** 2)
    canvas.add(np.ones((len(pos), N, N), np.complex64), pos)
    lit = canvas.result()
    x0, y0 = origin
    truth_start = type(lit)(object=obj[y0:y0 + shape[0], x0:x0 + shape[1]].copy(), weight=lit.weight,
                            x_coords=lit.x_coords, y_coords=lit.y_coords)
    flat_start = type(lit)(object=np.ones(shape, np.complex64), weight=lit.weight, x_coords=lit.x_coords,
                           y_coords=lit.y_coords)
    seen = []
    from_truth, p_truth, record = run_ptychi(amp, pos, probe, truth_start, iterations=4,
                                             progress=lambda d, t: seen.append((d, t)))
    from_flat, _, _ = run_ptychi(amp, pos, probe, flat_start, iterations=4)
    score = {name: score_reconstruction(name, r, obj, pos, probe, 0.0).metrics
             for name, r in (("truth", from_truth), ("flat", from_flat))}
    assert score["truth"]["phase_ssim"] > 0.95 and score["truth"]["phase_ssim"] > score["flat"]["phase_ssim"] + 0.1
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert record["sweeps"] == 4 and record["algorithm"] == "LSQML" and not record["probe_updated"]
    assert not record["cancelled"] and len(record["loss"]) == 4
    np.testing.assert_array_equal(p_truth, probe.astype(np.complex64))  # fixed unless asked
    np.testing.assert_array_equal(from_truth.x_coords, truth_start.x_coords)  # the start's grid comes back
    calls = iter([False, True])
    _, _, record = run_ptychi(amp, pos, probe, flat_start, iterations=4, cancel=lambda: next(calls))
    assert record["cancelled"] and record["sweeps"] == 1
    # through the runtime's one refinement entry point: a RefineResult, and a cancel raises with the partial result
    from ptycho_runtime.refinement import RefinementCancelled, RefineResult, refine

    result = refine(truth_start, amp, pos, probe, sweeps=2, engine="ptychi")
    assert isinstance(result, RefineResult) and result.record["engine"] == "ptychi" and result.record["sweeps"] == 2
    import threading

    stop = threading.Event()
    stop.set()
    with pytest.raises(RefinementCancelled) as info:
        refine(flat_start, amp, pos, probe, sweeps=3, engine="ptychi", cancel=stop)
    assert info.value.partial.record["cancelled"] and info.value.partial.record["sweeps"] == 0
    with pytest.raises(ValueError, match="algorithm"):
        run_ptychi(amp, pos, probe, flat_start, iterations=1, algorithm="dm")
    with pytest.raises(ValueError, match="positions"):
        run_ptychi(amp, pos[:-1], probe, flat_start, iterations=1)


@needs_ptychi
def test_ptychi_engine_refines_a_wrong_probe():
    """refine_probe=True: pty-chi updates the probe, and the data fit beats keeping the wrong probe fixed."""
    from ptycho_runtime.reconstruction.stitching import StitchCanvas, canvas_bounds
    from ptycho_runtime.refinement import far_field_misfit
    from ptycho_runtime.refinement.ptychi_engine import run_ptychi

    amp, pos, probe, obj = easy_scan()
    N = probe.shape[0]
    yy, xx = np.mgrid[:N, :N] - (N - 1) / 2
    wrong = (probe * np.exp(1j * 0.002 * (xx**2 + yy**2))).astype(np.complex64)  # a little defocus
    origin, shape = canvas_bounds(pos, N)
    canvas = StitchCanvas(shape, N, origin, window=np.abs(probe) ** 2)
    canvas.add(np.ones((len(pos), N, N), np.complex64), pos)
    flat = canvas.result()
    results = {flag: run_ptychi(amp, pos, wrong, flat, iterations=30, refine_probe=flag) for flag in (False, True)}
    misfit = {}
    for flag, (recon, new_probe, record) in results.items():
        assert record["probe_updated"] is flag
        starts = np.asarray(pos) - (N - 1) / 2 - np.array([recon.x_coords[0], recon.y_coords[0]])
        misfit[flag] = far_field_misfit(recon.object, amp, new_probe, starts)
    assert not np.allclose(results[True][1], wrong)
    assert misfit[True] < 0.5 * misfit[False], misfit


# --------------------------------------------------------------------------- CLI


def test_evaluate_cli_json_report_and_figure(make_bundle, capsys, tmp_path):
    bundle = make_bundle()
    scan = bundle.parent / "scan.npz"
    report_path, fig = tmp_path / "out" / "report.json", tmp_path / "out" / "eval.png"
    code, out, err = run_cli(capsys, "evaluate", bundle, scan, "--json", "-o", report_path, "--figure", fig)
    assert code == 0, err
    report = json.loads(out)
    assert json.loads(report_path.read_text()) == report
    assert report["n_patterns"] == load_npz(scan).n and report["stitching_window"].startswith("|probe|^2")
    net = report["network"]
    for key in ("phase_ssim", "amplitude_ssim", "phase_rmse_rad", "amplitude_rmse", "phase_psnr_db",
                "amplitude_psnr_db", "frc_resolution_px"):
        assert isinstance(net["metrics"][key], float), key
    assert -1 <= net["metrics"]["phase_ssim"] <= 1 and net["metrics"]["n_pixels"] > 1000
    assert net["wall_time_s"] > 0 and net["backend"] == "onnx"
    assert set(net["alignment"]["shift_px"]) == {"rows", "cols"} and isinstance(net["alignment"]["shift_applied"], bool)
    assert abs(net["alignment"]["shift_px"]["rows"]) <= 4 and abs(net["alignment"]["shift_px"]["cols"]) <= 4
    assert "reference" not in report and "speedup" not in report
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in fig.parent.iterdir() if p.name.startswith(".")]  # atomic: no temporary left behind

    code, out, err = run_cli(capsys, "evaluate", bundle, scan)
    assert code == 0, err
    assert "phase SSIM" in out and "FRC resolution" in out and "network" in out
    assert "amplitude scale removed" in out and report["amplitude_scale_removed"] is True

    code, out, err = run_cli(capsys, "evaluate", bundle, scan, "--keep-amplitude-scale", "--json")
    assert code == 0, err
    kept = json.loads(out)
    assert kept["amplitude_scale_removed"] is False and kept["network"]["alignment"]["amplitude_scale"] == 1.0
    assert kept["network"]["metrics"]["phase_ssim"] == pytest.approx(net["metrics"]["phase_ssim"])  # phase unchanged


def test_evaluate_cli_scores_a_perfect_reconstruction_perfectly(make_bundle, monkeypatch, capsys):
    """Feed the truth's own patches through the stitcher: the pipeline (stitch, mask, align, score) must say 1."""
    from ptycho_runtime.inference.bundle import Bundle

    bundle = make_bundle()
    scan = load_npz(bundle.parent / "scan.npz")

    real_infer = Bundle.infer

    def perfect_infer(self, x, batch_size=None, progress=None):  # the true patches, in the order the frames arrive
        from ptycho_export.data.simulate import extract_patches

        if x.shape[0] != scan.n:  # the load-time self-test's parity batch: the real model
            return real_infer(self, x, batch_size, progress)
        patches = extract_patches(scan.object, scan.xcoords, scan.ycoords, scan.N)
        return patches[:, None] * np.exp(0.7j)  # plus a global phase, which evaluate must remove

    monkeypatch.setattr(Bundle, "infer", perfect_infer)
    code, out, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--json")
    assert code == 0, err
    m = json.loads(out)["network"]["metrics"]
    assert m["phase_ssim"] > 0.99 and m["amplitude_ssim"] > 0.99, m
    assert m["phase_rmse_rad"] < 0.02


def test_evaluate_cli_bad_inputs_exit_2(make_bundle, capsys, tmp_path, monkeypatch):
    bundle = make_bundle()
    scan = load_npz(bundle.parent / "scan.npz")
    no_truth = tmp_path / "no_truth.npz"
    save_npz(no_truth, scan.subset(np.arange(scan.n)).__class__(
        diffraction=scan.diffraction, xcoords=scan.xcoords, ycoords=scan.ycoords, probe=scan.probe))
    code, out, err = run_cli(capsys, "evaluate", bundle, no_truth)
    assert code == 2 and "no objectGuess" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "evaluate", bundle, tmp_path / "missing.npz")
    assert code == 2 and "not found" in err
    code, _, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--min-weight", "1.5")
    assert code == 2 and "--min-weight" in err
    code, _, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--reference", "dm")
    assert code == 2

    from ptycho_export import reference

    def missing():
        raise reference.ReferenceUnavailableError("pty-chi is not installed; " + reference.INSTALL_HINT)

    monkeypatch.setattr(reference, "import_ptychi", missing)
    code, _, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--reference")
    assert code == 2 and "ptycho-export[reference]" in err


@needs_ptychi
def test_evaluate_cli_reference_row_and_speedup(make_bundle, capsys, tmp_path):
    bundle = make_bundle()
    fig = tmp_path / "eval.png"
    code, out, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--reference",
                             "--reference-iterations", "3", "--json", "--figure", fig)
    assert code == 0, err
    report = json.loads(out)
    ref = report["reference"]
    assert ref["engine"].startswith("pty-chi") and ref["engine"].endswith("ePIE")
    assert ref["iterations"] == 3 and ref["batch_size"] == 16
    assert isinstance(ref["metrics"]["phase_ssim"], float) and ref["wall_time_s"] > 0
    assert report["speedup"] == pytest.approx(ref["wall_time_s"] / report["network"]["wall_time_s"])
    assert fig.stat().st_size > 10_000
    code, out, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--reference", "lsqml",
                             "--reference-iterations", "2")
    assert code == 0, err
    assert "LSQML (2 it)" in out and "faster than pty-chi" in out
    code, out, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--reference", "epie,lsqml",
                             "--reference-iterations", "2", "--refine", "2", "--refine-max-sweeps", "0")
    assert code == 0, err
    assert "ePIE (2 it)" in out and "LSQML (2 it)" in out  # both in one table, from one invocation
    head = (r"(The network's start \('network( phase)?', the best fit after the trial sweeps\)|"
            r"The refined row finished a flat start \(start='auto': it fit the frames [0-9.]+x better .*\))")
    assert re.search(head + r" against a flat start, both after 2 sweeps: phase SSIM", out), out
    assert re.search(r"dB \((better on phase|worse on phase|a tie on phase: \|difference\| < 0\.002, the spread "
                     r"between two runs|flat start finished)\)", out), out
    assert "pty-chi epie: 2/2 iterations" in err and "pty-chi lsqml: 2/2 iterations" in err  # progress lines


@needs_ptychi
def test_evaluate_runs_several_references_in_one_call_and_draws_every_method(make_bundle, tmp_path):
    """ePIE and LSQML in one invocation (same data, same cores), progress lines, and a figure row per method."""
    from matplotlib.image import imread

    from ptycho_export.evaluate import evaluate, write_figure

    bundle = make_bundle()
    lines: list[str] = []
    ev = evaluate(bundle, bundle.parent / "scan.npz", reference=("epie", "lsqml"),
                  reference_iterations={"epie": 2, "lsqml": 3}, refine=2, progress=lines.append)
    report = ev.report
    assert [r["algorithm"] for r in report["references"]] == ["epie", "lsqml"]
    assert [r["iterations"] for r in report["references"]] == [2, 3]
    assert report["reference"] == report["references"][0]
    assert any(line.startswith("pty-chi lsqml: 3/3 iterations") for line in lines), lines
    gain = report["network_start_gain"]
    assert gain["phase_ssim"] == pytest.approx(report["refined"]["metrics"]["phase_ssim"]
                                               - report["refine_control"]["metrics"]["phase_ssim"])
    assert report["amplitude_scale_removed"] is True
    assert 0.2 < report["network"]["alignment"]["amplitude_scale"] < 5
    fig = write_figure(tmp_path / "all.png", ev)
    methods = 5  # network, network + refinement, the flat-start control, ePIE, LSQML
    assert imread(fig).shape[0] == pytest.approx(340 * (1 + 2 * methods), abs=2)


def test_evaluate_cli_refine_row_improves_on_the_network(make_bundle, capsys, tmp_path):
    """--refine N: the network's object after N refinement sweeps with the scan's probe is scored beside it."""
    bundle = make_bundle()
    fig = tmp_path / "eval.png"
    code, out, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--refine", "15", "--json",
                             "--figure", fig)
    assert code == 0, err
    report = json.loads(out)
    net, refined = report["network"], report["refined"]
    assert refined["iterations"] == 15 and refined["wall_time_s"] > net["wall_time_s"]
    # the scan is noiseless with the known probe: the data must pull the object towards the truth
    assert refined["metrics"]["phase_rmse_rad"] < 0.8 * net["metrics"]["phase_rmse_rad"], (net, refined)
    assert refined["metrics"]["amplitude_rmse"] < net["metrics"]["amplitude_rmse"]
    control = report["refine_control"]  # the same iterations from a flat object: scored, not compared here
    assert control["iterations"] == 15 and control["label"] == "refinement from a flat object"
    assert refined["engine"] == "builtin" and refined["batching"] == "sparse" and refined["probe_updated"] is False
    assert 0 < control["metrics"]["phase_rmse_rad"] < net["metrics"]["phase_rmse_rad"]
    assert fig.stat().st_size > 10_000
    code, out, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--refine")
    assert code == 0, err
    from ptycho_runtime.inference.scan_refinement import DEFAULT_COARSE_SWEEPS
    from ptycho_runtime.refinement import DEFAULT_SWEEPS
    from ptycho_runtime.refinement.engine import prepare_backend

    # the coarse level runs at the default; the backend is what "auto" takes here (numba where installed)
    what = f"{DEFAULT_SWEEPS} sweeps ({DEFAULT_COARSE_SWEEPS} coarse), {prepare_backend()}"
    assert f"network + {what}" in out and f"flat + {what}" in out
    code, out, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--refine", "3",
                             "--refine-backend", "onnx", "--refine-probe", "--amplitude-prior", "none",
                             "--refine-max-sweeps", "0", "--json")
    assert code == 0, err
    refined = json.loads(out)["refined"]
    assert refined["backend"] == "onnx" and refined["probe_updated"] is True and refined["sweeps"] == 3
    assert refined["amplitude_prior"] == {"rule": "none"}
    # a refined probe whose fit stays far above the noise sweeps on, up to --refine-max-sweeps (this tiny scan's
    # goes on to the limit), and the report's rows say how many ran and how many were asked for
    code, out, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--refine", "3",
                             "--refine-probe", "--refine-max-sweeps", "11", "--json")
    assert code == 0, err
    report = json.loads(out)
    for row in (report["refined"], report["refine_control"]):
        assert row["sweeps_requested"] == 3 and row["max_sweeps"] == 11
        assert row["iterations"] == row["sweeps"] == 3 + row["sweeps_extended"] == 11, row
        assert row["coarse_sweeps"] == 0  # 3 sweeps: 2 trial and 1 left, too few to follow a coarse one
    code, out, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--refine", "8",
                             "--coarse-sweeps", "2", "--json")
    assert code == 0, err
    report = json.loads(out)
    for row in (report["refined"], report["refine_control"]):  # the same coarse level for both starts
        assert row["coarse_sweeps"] == 2 and len(row["coarse_misfit_per_sweep"]) == 2 and row["sweeps"] == 8
    code, _, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--refine", "0")
    assert code == 2


def test_evaluate_cli_align_runs_the_overlap_solve_and_says_so(make_bundle, capsys):
    """--align MODE: the network row is stitched after the least-squares overlap solve, and the report names it."""
    bundle = make_bundle()
    code, out, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--align", "ramps", "--json")
    assert code == 0, err
    net = json.loads(out)["network"]
    assert net["align"] == "ramps" and "overlap solve" in net["time_covers"]
    assert isinstance(net["metrics"]["phase_ssim"], float)
    code, _, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--align", "planes")
    assert code == 2 and "--align" in err


def test_evaluate_refines_from_a_cover_of_the_frames_and_says_so(make_bundle, capsys):
    """gridsize 2: the refined row's network predicts a cover (as infer refines), the network row every group."""
    bundle = make_bundle(gridsize=2)
    runs = {}
    for rule in ("cover", "all"):
        code, out, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--refine", "2",
                                 "--start-groups", rule, "--json")
        assert code == 0, err
        runs[rule] = json.loads(out)
    cover, every = (runs[k]["refined"]["network_groups"] for k in ("cover", "all"))
    n = runs["all"]["n_patterns"]
    assert every == {"rule": "all", "groups": n, "frames": n}
    assert cover["rule"] == "cover" and cover["frames"] == n and 0 < cover["groups"] < 0.6 * n
    assert "groups network_groups says" in runs["cover"]["refined"]["time_covers"]
    # the network row is the same in both (every group), so the network-alone score does not depend on the rule
    assert runs["cover"]["network"]["metrics"] == runs["all"]["network"]["metrics"]
    code, _, err = run_cli(capsys, "evaluate", bundle, bundle.parent / "scan.npz", "--refine", "2",
                           "--start-groups", "half")
    assert code == 2 and "--start-groups" in err


def test_the_start_verdict_calls_a_gain_within_the_run_to_run_spread_a_tie():
    """A +0.000 phase SSIM with a lower PSNR was printed "better on phase": now a gain needs the spread's margin."""
    from ptycho_export.evaluate import START_TIE_PHASE_SSIM, start_verdict

    def verdict(delta, start="network phase"):
        return start_verdict({"phase_ssim": delta, "phase_psnr_db": -0.12}, start)

    assert verdict(0.0002) == verdict(-0.0015) == "a tie"
    assert verdict(START_TIE_PHASE_SSIM + 1e-4) == "better" and verdict(0.061) == "better"
    assert verdict(-0.01) == "worse"
    assert verdict(0.05, start="flat") == "flat start finished"  # the network's start was not used: no verdict on it


def test_the_gain_line_says_which_start_auto_finished_and_why():
    from ptycho_export.cli.evaluate_command import _start_line

    flat = _start_line({"start": "flat", "start_rule": "auto",
                        "start_misfit": {"network": 0.02, "network phase": 0.01, "flat": 0.005}})
    assert "finished a flat start" in flat and "2.0x better" in flat and "was not used" in flat
    assert _start_line({"start": "network phase", "start_rule": "auto", "start_misfit": {}}).startswith(
        "The network's start ('network phase'")
    assert _start_line({"start": "network", "start_rule": "network"}) == "The refined row's start (network)"
