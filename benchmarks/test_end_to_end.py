"""The whole path on one scan: network + default refinement, against pty-chi's ePIE and LSQML, one run, same cores.

The question a beamline asks: how long from frames to a good object? The scan
is the project's held-out realistic scan (``ptycho_export.data.realistic``,
seed ``TEST_SEED``: zone plate, ~7e5 photons, 1,000 positions; 60 in smoke
mode), reconstructed by the shipped bundle ``models/realistic-zoneplate-n64-g2.h5``.
Each path is scored against the true object after timing
(``ptycho_export.evaluate.score_reconstruction``), so the ratios are between
reconstructions whose quality is recorded beside them.

Paths (group ``end_to_end_N64_n{positions}``):
- ``network``: ``Bundle.reconstruct`` (inference + |P|²-weighted stitching);
- ``network_refined``: the same with ``refine=True`` (the default refinement: 16
  sweeps of the batched engine with the scan's probe, 4 of them on the coarse
  level), what ``ptycho-runtime infer`` does by default;
- ``ptychi_epie`` / ``ptychi_lsqml``: pty-chi from a flat object, 100 / 200
  epochs (2 each in smoke mode), as ``ptycho-export evaluate --reference``.
report.py prints each path's wall time, its quality and the ratio to
``network_refined`` of the same run. Loading (the bundle, and numba's compiled
loops where the runtime's [fast] extra is installed) is not timed.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from ptycho_runtime.reconstruction.compiled import available_kernels
from ptycho_runtime.refinement import DEFAULT_SWEEPS

from ._common import REPO, SMOKE, common_info

N = 64
POSITIONS = 60 if SMOKE else 1000
BUNDLE = REPO / "models" / "realistic-zoneplate-n64-g2.h5"
PATHS = ("network", "network_refined", "ptychi_epie", "ptychi_lsqml")
EPOCHS = {"ptychi_epie": 2 if SMOKE else 100, "ptychi_lsqml": 2 if SMOKE else 200}
GROUP = f"end_to_end_N{N}_n{POSITIONS}"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """The held-out scan as a file would hold it, read back as every tool reads it (units, probe scale)."""
    pytest.importorskip("skimage")
    from ptycho_export.data import load_npz
    from ptycho_export.data.realistic import TEST_SEED, realistic_scan, save_realistic_npz

    path = tmp_path_factory.mktemp("scan") / "test.npz"
    save_realistic_npz(path, realistic_scan(seed=TEST_SEED, n_positions=POSITIONS))
    return load_npz(path)


def _run(path: str, bundle, data, positions: np.ndarray):
    import ptycho_runtime as pr

    if path.startswith("network"):
        return bundle.reconstruct(data.diffraction, positions, counts=False, window=pr.probe_window(data.probe),
                                  refine=path == "network_refined", probe=data.probe)
    from ptycho_export.reference import run_reference

    algorithm = path.split("_")[1]
    return run_reference(data.diffraction, positions, data.probe, algorithm, EPOCHS[path]).reconstruction


@pytest.mark.parametrize("path", PATHS)
def test_end_to_end(benchmark, held_out, path):
    import time

    import ptycho_runtime as pr
    from ptycho_export.evaluate import score_reconstruction

    if path.startswith("ptychi"):
        from ptycho_export.reference import ReferenceUnavailableError, import_ptychi

        try:
            import_ptychi()
        except ReferenceUnavailableError as exc:
            pytest.skip(str(exc))
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed")
    bundle = pr.load_bundle(BUNDLE)
    available_kernels()  # numba's compiled loops where installed: loaded with the bundle, not timed (as evaluate)
    data = held_out
    positions = np.stack([data.xcoords, data.ycoords], axis=1)
    out = {}

    def once():
        out["recon"] = _run(path, bundle, data, positions)

    benchmark.group = GROUP
    t0 = time.perf_counter()
    benchmark.pedantic(once, rounds=1, warmup_rounds=0)  # minutes for pty-chi: one round, the wall time is the point
    wall = time.perf_counter() - t0
    metrics = score_reconstruction(path, out["recon"], data.object, positions, data.probe, wall).metrics
    assert np.isfinite(metrics["phase_ssim"])  # functional check: a scoreable object came out
    benchmark.extra_info.update({
        "kind": "end_to_end", "path": path, "N": N, "positions": POSITIONS, "wall_s": wall,
        "epochs": EPOCHS.get(path, DEFAULT_SWEEPS if path == "network_refined" else 0),
        "phase_ssim": metrics["phase_ssim"], "amplitude_ssim": metrics["amplitude_ssim"],
        "phase_rmse_rad": metrics["phase_rmse_rad"], **common_info(),
    })
