"""The least-squares overlap solve: known per-patch phase planes come back out, up to one global plane."""

import h5py
import numpy as np
import pytest

from ptycho_runtime import cli, load_bundle
from ptycho_runtime.files.npz import read_npz_arrays
from ptycho_runtime.reconstruction.alignment import stitch_scan
from ptycho_runtime.reconstruction.overlap_solve import solve_overlap_planes
from ptycho_runtime.reconstruction.stitching import stitch_patches

N = 32
LOCAL = np.arange(N) - (N - 1) / 2


def _object(size=110):
    yy, xx = np.mgrid[:size, :size]
    return (0.8 + 0.2 * np.sin(xx / 3.0)) * np.exp(1j * (2 * np.cos(yy / 9.0) + 1.5 * np.sin(xx / 11.0)))


def _read(obj, positions):
    """Bilinear reads of the object under each frame (frame centre (N−1)/2), as a network would ideally return."""
    out = []
    for x, y in positions - (N - 1) / 2:
        ix, iy = int(np.floor(x)), int(np.floor(y))
        fx, fy = x - ix, y - iy
        a = obj[iy:iy + N + 1, ix:ix + N + 1]
        out.append((1 - fy) * (1 - fx) * a[:-1, :-1] + (1 - fy) * fx * a[:-1, 1:] + fy * (1 - fx) * a[1:, :-1]
                   + fy * fx * a[1:, 1:])
    return np.array(out, np.complex64)


def _scene(seed=0, step=6.0, size=110, origin=(0.0, 0.0)):
    rng = np.random.default_rng(seed)
    g = np.arange(N / 2 + 2, size - N / 2 - 3, step)
    pos = np.array([(x, y) for y in g for x in g]) + rng.uniform(-1.5, 1.5, (g.size ** 2, 2))
    return _read(_object(size), pos), pos + np.asarray(origin), rng


def _window():
    yl, xl = np.meshgrid(LOCAL, LOCAL, indexing="ij")
    return np.exp(-2 * ((xl / 10) ** 2 + (yl / 10) ** 2))  # |P|² of a Gaussian probe


def _match(rec, truth):
    """Largest error of a stitched object against the truth over well-covered pixels, up to one global plane."""
    cov = rec.weight > 0.2 * rec.weight.max()
    q = np.where(cov, rec.object * np.conj(truth), 0)
    gx = np.angle(np.sum(q[:, 1:] * np.conj(q[:, :-1])))  # the plane's slope, free of 2π
    gy = np.angle(np.sum(q[1:, :] * np.conj(q[:-1, :])))
    yy, xx = np.mgrid[:q.shape[0], :q.shape[1]]
    flat = rec.object * np.exp(-1j * (gx * xx + gy * yy))
    g = np.exp(-1j * np.angle(np.sum((flat * np.conj(truth))[cov])))
    return np.abs(flat[cov] * g - truth[cov]).max()


def _planes(offset, ramp, pos, centre=None):
    """Per-patch factors exp(i·(offset + ramp·(u − centre))) over each frame's pixels."""
    centre = pos if centre is None else centre
    d = pos - centre
    base = offset + ramp[:, 0] * d[:, 0] + ramp[:, 1] * d[:, 1]
    return np.exp(1j * (base[:, None, None] + ramp[:, 0, None, None] * LOCAL[None, None, :]
                        + ramp[:, 1, None, None] * LOCAL[None, :, None]))


def _left_over(total_offset, total_ramp, centre):
    """What remains of per-patch planes after removing the best global plane (offsets wrapped)."""
    g = total_ramp.mean(axis=0)
    r = np.angle(np.exp(1j * (total_offset - centre @ g)))
    r = np.angle(np.exp(1j * (r - np.angle(np.mean(np.exp(1j * r))))))
    return np.abs(r).max(), np.abs(total_ramp - g).max()


def test_offsets_and_ramps_of_any_size_are_recovered_per_patch():
    patches, pos, rng = _scene()
    a = rng.uniform(-3 * np.pi, 3 * np.pi, len(patches))  # wrapped many times over
    b = rng.normal(0, 0.05, (len(patches), 2))  # ±0.8 rad across a frame
    bad = patches * _planes(a, b, pos)
    planes = solve_overlap_planes(bad, pos, window=_window(), model="ramps", ramp_damping=0)
    assert planes.n_isolated == 0 and planes.n_pairs > len(patches)
    off, ramp = _left_over(planes.offset + a, planes.ramp + b, pos)
    assert off < 0.03 and ramp < 1e-3
    # stitched, the corrected patches give the object back up to one global phase
    fixed = stitch_patches(bad * planes.factors(pos, N), pos, object_shape=(110, 110), window=_window())
    assert _match(fixed, _object()) < 0.05  # the object, up to the applied planes' mean (the gauge)
    raw = stitch_patches(bad, pos, object_shape=(110, 110), window=_window())
    assert _match(raw, _object()) > 0.5  # the uncorrected stitch is far off


def test_damped_ramps_still_undo_offsets_and_keep_ramps_near_the_patches_own():
    patches, pos, rng = _scene(seed=6)
    a = rng.uniform(-3 * np.pi, 3 * np.pi, len(patches))
    b = rng.normal(0, 0.01, (len(patches), 2))
    bad = patches * _planes(a, b, pos)
    damped = solve_overlap_planes(bad, pos, window=_window(), model="ramps")  # DEFAULT_RAMP_DAMPING
    free = solve_overlap_planes(bad, pos, window=_window(), model="ramps", ramp_damping=0)
    assert np.abs(damped.ramp).max() < 0.5 * np.abs(free.ramp).max()
    rec = stitch_patches(bad * damped.factors(pos, N), pos, object_shape=(110, 110), window=_window())
    assert _match(rec, _object()) < 0.5 * _match(stitch_patches(bad, pos, object_shape=(110, 110),
                                                                window=_window()), _object())


def test_one_plane_per_group_and_the_offsets_only_model():
    patches, pos, rng = _scene(seed=1)
    n_side = int(round(np.sqrt(len(patches))))
    ij = np.array([(i, j) for j in range(n_side) for i in range(n_side)])
    groups = (ij[:, 0] // 2) * 1000 + ij[:, 1] // 2  # 2×2 blocks of neighbours, like gridsize 2
    _, gidx = np.unique(groups, return_inverse=True)
    G = gidx.max() + 1
    centre = np.zeros((G, 2))
    np.add.at(centre, gidx, pos)
    centre /= np.bincount(gidx)[:, None]
    a, b = rng.uniform(-3 * np.pi, 3 * np.pi, G), rng.normal(0, 0.04, (G, 2))
    bad = patches * _planes(a[gidx], b[gidx], pos, centre[gidx])
    planes = solve_overlap_planes(bad, pos, window=_window(), groups=groups, model="ramps", ramp_damping=0)
    assert np.allclose(planes.centre, centre)
    off, ramp = _left_over(planes.offset + a, planes.ramp + b, centre)
    assert off < 0.03 and ramp < 1e-3
    # offsets alone undo offsets alone (the ramps stay zero)
    bad = patches * np.exp(1j * a[gidx])[:, None, None]
    planes = solve_overlap_planes(bad, pos, window=_window(), groups=groups, model="offsets")
    assert np.all(planes.ramp == 0)
    off, _ = _left_over(planes.offset + a, np.zeros((G, 2)), centre)
    assert off < 0.03


def test_a_global_offset_changes_nothing_and_consistent_patches_are_left_alone():
    patches, pos, rng = _scene(seed=2, step=7.0)
    a = rng.uniform(-1, 1, len(patches))
    bad = patches * np.exp(1j * a)[:, None, None]
    one = solve_overlap_planes(bad, pos, window=_window(), model="ramps", ramp_damping=0)
    two = solve_overlap_planes(bad * np.exp(2.5j), pos, window=_window(), model="ramps", ramp_damping=0)
    assert np.allclose(one.offset, two.offset, atol=1e-4) and np.allclose(one.ramp, two.ramp, atol=1e-6)
    clean = solve_overlap_planes(patches, pos, window=_window(), model="ramps", ramp_damping=0)
    assert np.abs(clean.offset).max() < 0.02 and np.abs(clean.ramp).max() < 1e-3  # no invented global plane


def test_separate_clusters_are_solved_apart_and_a_lone_patch_is_left_as_it_is():
    p1, pos1, rng = _scene(seed=3, step=8.0, size=80)
    p2, pos2, _ = _scene(seed=4, step=8.0, size=80, origin=(500.0, 0.0))  # far away: no overlap with the first
    lone = p1[:1] * np.exp(2j)
    patches = np.concatenate([p1, p2, lone])
    pos = np.concatenate([pos1, pos2, [[1000.0, 1000.0]]])
    a = rng.uniform(-3 * np.pi, 3 * np.pi, len(patches))
    planes = solve_overlap_planes(patches * np.exp(1j * a)[:, None, None], pos, window=_window(), model="offsets")
    assert planes.n_isolated == 1
    assert planes.offset[-1] == 0 and np.all(planes.ramp[-1] == 0)
    for sel in (slice(0, len(p1)), slice(len(p1), len(p1) + len(p2))):
        off, _ = _left_over(planes.offset[sel] + a[sel], np.zeros((len(a[sel]), 2)), pos[sel])
        assert off < 0.03  # each cluster on one phase of its own
        assert abs(np.angle(np.mean(np.exp(1j * planes.offset[sel])))) < 1e-9  # and adds no offset to either


def test_stitch_scan_aligns_with_the_solve():
    patches, pos, rng = _scene(seed=5)
    bad = patches * np.exp(1j * rng.uniform(-np.pi, np.pi, len(patches)))[:, None, None]
    rec = stitch_scan(bad, pos, window=_window(), align="offsets", object_shape=(110, 110))
    assert _match(rec, _object()) < 0.05
    with pytest.raises(ValueError, match="align must be one of"):
        stitch_scan(bad, pos, window=_window(), align="planes")


@pytest.mark.parametrize("kwargs, match", [
    (dict(positions=np.zeros((3, 2))), "must match"),
    (dict(patches=np.zeros((4, N, N - 1), complex)), "must match"),
    (dict(positions=np.full((4, 2), np.nan)), "finite"),
    (dict(model="plane"), "model must be one of"),
    (dict(groups=np.zeros(3, int)), "groups must be 4 integers"),
    (dict(groups=np.zeros(4)), "groups must be 4 integers"),
    (dict(bin_factor=3), "bin_factor must be a positive divisor"),
    (dict(passes=-1), "passes must be an integer"),
    (dict(solver="lu"), "solver must be"),
    (dict(min_overlap=0.0), "min_overlap"),
    (dict(ramp_damping=-1.0), "ramp_damping"),
    (dict(window=np.ones((N, N + 1))), "window must have shape"),
])
def test_bad_input_is_refused_with_the_fix(kwargs, match):
    args = dict(patches=np.ones((4, N, N), complex), positions=np.arange(8.0).reshape(4, 2) * 3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        solve_overlap_planes(**args)


def test_bundle_reconstruct_takes_the_solve_by_name(g1_bundle, g1_scan):
    diffraction, positions = g1_scan
    plain = g1_bundle.reconstruct(diffraction, positions)
    aligned = g1_bundle.reconstruct(diffraction, positions, align="offsets")
    assert aligned.object.shape == plain.object.shape and np.array_equal(aligned.weight, plain.weight)
    assert np.all(np.isfinite(aligned.object)) and not np.allclose(aligned.object, plain.object)
    with pytest.raises(ValueError, match="align must be one of"):
        g1_bundle.reconstruct(diffraction, positions, align="ramp")
    with pytest.raises(ValueError, match="not both"):
        g1_bundle.reconstruct(diffraction, positions, align="offsets", align_phase=5)


def test_infer_align_writes_the_aligned_object(bundle_path, tmp_path, capsys):
    path = bundle_path("n64_g1")
    scan_file = path.parent / "scan.npz"
    out = tmp_path / "recon.h5"
    assert cli.main(["infer", str(path), str(scan_file), "-o", str(out), "--align", "ramps", "--no-refine"]) == 0, \
        capsys.readouterr().err
    scan = read_npz_arrays(scan_file)
    pos = np.stack([scan["xcoords"], scan["ycoords"]], axis=1)
    expected = load_bundle(path).reconstruct(scan["diffraction"], pos, align="ramps")
    with h5py.File(out, "r") as f:
        np.testing.assert_allclose(f["object"][()], expected.object, atol=1e-5)
    capsys.readouterr()
    assert cli.main(["infer", str(path), str(scan_file), "-o", str(out), "--align", "ramps",
                     "--align-phase", "5"]) == 2
    assert "not both" in capsys.readouterr().err
