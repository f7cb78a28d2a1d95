"""infer-many's per-scan work with refinement, without Dask: the functions each task runs, called directly.

The Dask run itself is in test_infer_many.py (needs the [dask] extra); here the same
functions run in this process, so the refinement step is tested wherever the runtime is.
"""

from __future__ import annotations

import numpy as np
import pytest

from ptycho_runtime.cli.main import build_parser
from ptycho_runtime.distributed import infer_many as im
from ptycho_runtime.files.npz import read_npz_arrays
from ptycho_runtime.inference.scan_refinement import RefineSettings
from ptycho_runtime.reconstruction.geometry import frame_origin
from ptycho_runtime.refinement import DEFAULT_SWEEPS, far_field_misfit


def _stitched(bundle, loaded, chunk_frames=7):
    """The tasks of one scan in order: chunks → partials → merge → the whole scan's object."""
    plan = im.scan_plan(loaded)
    parts = [im.chunk_partial(bundle, im.take_chunk(loaded, a, b)) for a, b in im._chunks(plan.n_groups, chunk_frames)]
    return im.finish_scan(plan, im.merge_partials(*parts))


def _misfit(rec, amp, probe, positions):
    starts = frame_origin(positions, amp.shape[-1]) - np.array([rec.x_coords[0], rec.y_coords[0]])
    return far_field_misfit(np.where(rec.covered, rec.object, 1.0).astype(np.complex64), amp, probe, starts)


def test_each_scan_is_refined_with_its_own_probe_as_bundle_reconstruct_refines(g1_bundle, fixture_dir):
    scan_path = str(fixture_dir / "n64_g1" / "scan.npz")
    loaded = im.read_scan(g1_bundle, scan_path, keep_frames=True)
    plan, amp, probe = loaded[0], loaded[3], loaded[4]
    scan = read_npz_arrays(scan_path)
    np.testing.assert_array_equal(probe, scan["probeGuess"])  # the scan's own probe, not the bundle's
    network = _stitched(g1_bundle, loaded)
    settings = RefineSettings(sweeps=5)
    refined = im.refine_stitched(loaded, network, settings)
    # what infer does on one machine: Bundle.reconstruct with refine= and the scan's probeGuess
    ref = g1_bundle.reconstruct(scan["diffraction"], plan.positions, refine=settings, probe=scan["probeGuess"])
    np.testing.assert_allclose(refined.object, ref.object, rtol=0, atol=1e-4)
    np.testing.assert_allclose(refined.probe, ref.probe, rtol=0, atol=1e-6)
    r = refined.refinement
    assert r["sweeps"] == 5 == r["sweeps_requested"]
    assert r["probe_source"] == "the host's probe"
    assert r["frames_refined"] == plan.n_patterns
    assert r["probe_source"] == ref.refinement["probe_source"] and r["start"] == ref.refinement["start"]
    assert _misfit(refined, amp, refined.probe, plan.positions) < 0.8 * _misfit(network, amp, refined.probe,
                                                                                 plan.positions)
    np.testing.assert_array_equal(refined.object[~refined.covered], 0)  # uncovered pixels as infer fills them
    assert network.refinement is None and network.probe is None


def test_refining_needs_the_frames_kept(g1_bundle, fixture_dir):
    loaded = im.read_scan(g1_bundle, str(fixture_dir / "n64_g1" / "scan.npz"))
    assert len(loaded) == 3  # without refinement the frames are not held twice
    with pytest.raises(ValueError, match="keep_frames=True"):
        im.refine_stitched(loaded, _stitched(g1_bundle, loaded), RefineSettings(sweeps=1))


@pytest.mark.parametrize(("argv", "refine"), [([], None), (["--refine"], DEFAULT_SWEEPS), (["--refine", "7"], 7),
                                              (["--no-refine"], 0), (["--refine", "0"], 0)])
def test_infer_many_refine_options(argv, refine):
    args = build_parser().parse_args(["infer-many", "B.h5", "s.npz", "-o", "out", *argv])
    assert args.refine == refine


def test_refine_and_no_refine_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["infer-many", "B.h5", "s.npz", "-o", "out", "--refine", "3", "--no-refine"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_gridsize_2_scan_to_refine_is_loaded_as_a_cover_and_refined_as_infer_refines(fixture_dir):
    """read_scan(groups="cover") holds the groups Bundle.reconstruct(refine=...) predicts; the record says so."""
    import ptycho_runtime as pr

    bundle = pr.load_bundle(fixture_dir / "n64_g2" / "wts.h5")
    scan_path = str(fixture_dir / "n64_g2" / "scan.npz")
    loaded = im.read_scan(bundle, scan_path, keep_frames=True, groups="cover")
    plan = loaded[0]
    assert plan.n_groups < 0.6 * plan.n_patterns
    settings = RefineSettings(sweeps=2, refine_probe=False)
    refined = im.refine_stitched(loaded, _stitched(bundle, loaded), settings)
    scan = read_npz_arrays(scan_path)
    ref = bundle.reconstruct(scan["diffraction"], plan.positions, refine=settings, probe=scan["probeGuess"])
    assert refined.refinement["network_groups"] == ref.refinement["network_groups"] == {
        "rule": "cover", "groups": plan.n_groups, "frames": plan.n_patterns}
    np.testing.assert_allclose(refined.object, ref.object, rtol=0, atol=1e-4)
