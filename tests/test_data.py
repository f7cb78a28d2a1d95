"""Tests for ptycho_export.data: simulation physics, NPZ contract, grouping."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import ptycho_export.data  # noqa: F401
except ImportError:  # running without an installed package / pytest pythonpath
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptycho_export.data import (
    OBJECT_KINDS,
    GroupedData,
    PtychoData,
    default_probe,
    extract_patches,
    far_field_amplitude,
    group_neighbors,
    intensity_scale_from_nphotons,
    load_npz,
    make_groups,
    make_object,
    normalization_factor,
    save_npz,
    scan_positions,
    simulate_scan,
)
from ptycho_runtime.files.npz import detect_units


@pytest.fixture(scope="module")
def scan64() -> PtychoData:
    return simulate_scan(N=64, seed=1)


@pytest.fixture(scope="module")
def small() -> PtychoData:
    return simulate_scan(N=16, object_size=64, step=4, seed=2)


# ---------------------------------------------------------------- simulate


def test_simulate_scan_defaults_shapes_and_dtypes(scan64: PtychoData) -> None:
    d = scan64
    assert d.n == 289 and d.N == 64
    assert d.diffraction.shape == (289, 64, 64) and d.diffraction.dtype == np.float32
    assert d.xcoords.dtype == np.float64 and d.ycoords.shape == (289,)
    assert d.probe.shape == (64, 64) and d.probe.dtype == np.complex64
    assert d.object.shape == (320, 320) and d.object.dtype == np.complex64
    assert d.patches.shape == (289, 64, 64) and d.patches.dtype == np.complex64
    assert d.scan_index.dtype == np.int64
    assert np.all(d.diffraction >= 0)


def test_simulate_scan_is_deterministic(small: PtychoData) -> None:
    again = simulate_scan(N=16, object_size=64, step=4, seed=2)
    np.testing.assert_array_equal(small.diffraction, again.diffraction)
    np.testing.assert_array_equal(small.object, again.object)
    other = simulate_scan(N=16, object_size=64, step=4, seed=3)
    assert not np.array_equal(small.diffraction, other.diffraction)
    r1 = simulate_scan(N=16, object_size=64, scan="random", n_positions=50, seed=4)
    r2 = simulate_scan(N=16, object_size=64, scan="random", n_positions=50, seed=4)
    assert r1.n == 50
    np.testing.assert_array_equal(r1.xcoords, r2.xcoords)
    np.testing.assert_array_equal(r1.diffraction, r2.diffraction)


@pytest.mark.parametrize("kind", OBJECT_KINDS)
def test_make_object_range_and_determinism(kind: str) -> None:
    a = make_object(kind, 96, seed=5)
    assert a.shape == (96, 96) and a.dtype == np.complex64
    amp, ph = np.abs(a), np.angle(a)
    assert amp.min() >= 0.5 - 1e-5 and amp.max() <= 1.0 + 1e-6
    assert ph.min() >= -np.pi / 2 - 1e-5 and ph.max() <= np.pi / 2 + 1e-5
    assert amp.std() > 0.02 and ph.std() > 0.05  # has structure
    np.testing.assert_array_equal(a, make_object(kind, 96, seed=5))
    assert not np.array_equal(a, make_object(kind, 96, seed=6))


def test_make_object_unknown_kind_lists_allowed() -> None:
    with pytest.raises(ValueError, match="lines.*grf"):
        make_object("spirals", 64, 0)


@pytest.mark.parametrize("N", [8, 16, 64, 128])
def test_default_probe_normalised_and_centred(N: int) -> None:
    p = default_probe(N)
    assert p.shape == (N, N) and p.dtype == np.complex64
    assert np.sum(np.abs(p.astype(np.complex128)) ** 2) == pytest.approx((N / 2) ** 2, rel=1e-5)
    r, c = np.unravel_index(np.argmax(np.abs(p)), p.shape)
    assert abs(r - N / 2) <= 1 and abs(c - N / 2) <= 1
    # ~90% of the intensity within N/4 of the centre, for every N ≥ 16
    yy, xx = np.mgrid[:N, :N]
    inside = np.hypot(yy - N / 2, xx - N / 2) <= N / 4 + 0.5
    if N >= 16:
        frac = np.sum(np.abs(p[inside]) ** 2) / np.sum(np.abs(p) ** 2)
        assert 0.8 < frac < 0.97


def test_default_probe_rejects_odd_N() -> None:
    with pytest.raises(ValueError, match="even"):
        default_probe(63)


def test_scan_positions_keep_patches_inside() -> None:
    x, y = scan_positions(100, 16, "grid", step=5)
    assert x.min() >= 7.5 and x.max() <= 91.5 and y.min() >= 7.5 and y.max() <= 91.5
    np.testing.assert_allclose(np.unique(np.diff(np.unique(x))), 5.0)
    xr, yr = scan_positions((80, 120), 16, "random", n=500, seed=0)
    assert xr.shape == (500,) and xr.min() >= 7.5 and xr.max() <= 111.5 and yr.max() <= 71.5
    obj = np.ones((80, 120), np.complex64)
    assert np.all(extract_patches(obj, xr, yr, 16) != 0)  # nothing sampled outside
    with pytest.raises(ValueError, match="kind"):
        scan_positions(100, 16, "spiral")


def test_extract_patches_integer_positions_exact() -> None:
    rng = np.random.default_rng(0)
    obj = (rng.standard_normal((40, 50)) + 1j * rng.standard_normal((40, 50))).astype(np.complex64)
    x = np.array([10.0, 25.0, 42.0]) - 0.5  # (N-1)/2 centre: whole-pixel starts
    y = np.array([8.0, 20.0, 32.0]) - 0.5
    p = extract_patches(obj, x, y, 16)
    assert p.shape == (3, 16, 16) and p.dtype == np.complex64
    for k in range(3):
        r0, c0 = int(y[k] + 0.5) - 8, int(x[k] + 0.5) - 8
        np.testing.assert_array_equal(p[k], obj[r0 : r0 + 16, c0 : c0 + 16])


def test_extract_patches_bilinear_and_outside() -> None:
    rng = np.random.default_rng(1)
    obj = rng.standard_normal((30, 30)).astype(np.complex64)
    half = extract_patches(obj, np.array([12.0]), np.array([14.5]), 8)[0]
    np.testing.assert_allclose(half, 0.5 * (obj[11:19, 8:16] + obj[11:19, 9:17]), atol=1e-6)
    # general fractional position against a direct formula
    x, y = 12.8, 9.3
    got = extract_patches(obj, np.array([x]), np.array([y]), 8)[0]
    r0, c0, fy, fx = 5, 9, 0.8, 0.3  # floor(9.3 - 3.5) = 5, floor(12.8 - 3.5) = 9
    want = (
        (1 - fy) * (1 - fx) * obj[r0 : r0 + 8, c0 : c0 + 8]
        + (1 - fy) * fx * obj[r0 : r0 + 8, c0 + 1 : c0 + 9]
        + fy * (1 - fx) * obj[r0 + 1 : r0 + 9, c0 : c0 + 8]
        + fy * fx * obj[r0 + 1 : r0 + 9, c0 + 1 : c0 + 9]
    )
    np.testing.assert_allclose(got, want, atol=1e-5)
    # pixels outside the object read as zero
    edge = extract_patches(obj, np.array([1.5]), np.array([1.5]), 8)[0]
    assert np.all(edge[:2, :] == 0) and np.all(edge[:, :2] == 0)
    np.testing.assert_array_equal(edge[2:, 2:], obj[:6, :6])


def test_far_field_parseval_and_dtype() -> None:
    rng = np.random.default_rng(2)
    patches = (rng.standard_normal((5, 16, 16)) + 1j * rng.standard_normal((5, 16, 16))).astype(np.complex64)
    probe = default_probe(16)
    amp = far_field_amplitude(patches, probe)
    assert amp.shape == (5, 16, 16) and amp.dtype == np.float32
    np.testing.assert_allclose(
        np.sum(amp.astype(np.float64) ** 2, axis=(1, 2)),
        np.sum(np.abs(patches * probe) ** 2, axis=(1, 2)),
        rtol=1e-5,
    )


def test_far_field_constant_patch_flat_probe_single_central_peak() -> None:
    N = 16
    amp = far_field_amplitude(np.full((1, N, N), 0.5, np.complex64), np.ones((N, N), np.complex64))[0]
    assert amp[N // 2, N // 2] == pytest.approx(0.5 * N, rel=1e-6)  # |N²·c| / N
    amp[N // 2, N // 2] = 0
    assert np.abs(amp).max() < 1e-5


def test_intensity_scale_and_normalization_factor() -> None:
    assert intensity_scale_from_nphotons(1e9, 64) == pytest.approx(np.sqrt(1e9) / 32)
    with pytest.raises(ValueError):
        intensity_scale_from_nphotons(0, 64)
    amps = np.random.default_rng(3).uniform(0, 3, (7, 16, 16))
    f = normalization_factor(amps)
    assert np.mean(np.sum((f * amps) ** 2, axis=(1, 2))) == pytest.approx(64.0, rel=1e-10)
    with pytest.raises(ValueError, match="normalise"):
        normalization_factor(np.zeros((2, 8, 8)))


@pytest.mark.parametrize("nphotons", [1e4, 1e9])
def test_simulate_photon_counts_and_normalisation(nphotons: float) -> None:
    N = 16
    d = simulate_scan(N=N, object_size=64, step=4, nphotons=nphotons, seed=7)
    s = intensity_scale_from_nphotons(nphotons, N)
    counts = (d.diffraction.astype(np.float64) * s) ** 2
    if nphotons <= 1e4:  # stored sqrt(counts)/s really came from integers
        np.testing.assert_allclose(counts, np.round(counts), atol=1e-2)
    exit_energy = np.sum(np.abs(d.patches * d.probe).astype(np.float64) ** 2, axis=(1, 2))
    expected = nphotons * exit_energy.mean() / (N / 2) ** 2
    assert counts.sum(axis=(1, 2)).mean() == pytest.approx(expected, rel=0.03)
    # stored amplitude is in normalised units: mean Σ X² ≈ mean Σ|obj·probe|² ≲ (N/2)²
    energy = np.sum(d.diffraction.astype(np.float64) ** 2, axis=(1, 2)).mean()
    assert energy == pytest.approx(exit_energy.mean(), rel=0.03)
    assert 0.25 * (N / 2) ** 2 < energy <= 1.05 * (N / 2) ** 2
    # the noiseless physics times s is sqrt(expected counts)
    clean = far_field_amplitude(d.patches, d.probe).astype(np.float64)
    if nphotons >= 1e9:
        # |sqrt(k) - sqrt(λ)| stays below ~4 for Poisson k, even at λ ≈ 7 and k = 0
        np.testing.assert_allclose(d.diffraction, clean, rtol=0.05, atol=4 / s)


# ---------------------------------------------------------------- container


def test_container_validation_names_field() -> None:
    good = dict(
        diffraction=np.zeros((3, 8, 8)),
        xcoords=np.zeros(3),
        ycoords=np.zeros(3),
        probe=np.ones((8, 8)),
    )
    d = PtychoData(**good)
    assert d.diffraction.dtype == np.float32 and d.probe.dtype == np.complex64
    with pytest.raises(ValueError, match=r"probe has shape \(4, 4\).*\(8, 8\)"):
        PtychoData(**{**good, "probe": np.ones((4, 4))})
    with pytest.raises(ValueError, match=r"xcoords has shape \(2,\)"):
        PtychoData(**{**good, "xcoords": np.zeros(2)})
    with pytest.raises(ValueError, match="patches"):
        PtychoData(**good, patches=np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="diffraction must be real"):
        PtychoData(**{**good, "diffraction": np.zeros((3, 8, 8), complex)})


def test_subset_and_spatial_split(small: PtychoData) -> None:
    sub = small.subset([4, 0, 2])
    np.testing.assert_array_equal(sub.diffraction, small.diffraction[[4, 0, 2]])
    np.testing.assert_array_equal(sub.xcoords, small.xcoords[[4, 0, 2]])
    assert sub.object is small.object
    train, test = small.split(0.75)
    assert train.n == round(0.75 * small.n) and train.n + test.n == small.n
    assert train.ycoords.max() <= test.ycoords.min()  # top trains, bottom tests
    r1, _ = small.split(0.5, seed=1, mode="random")
    r2, _ = small.split(0.5, seed=1, mode="random")
    np.testing.assert_array_equal(r1.xcoords, r2.xcoords)
    with pytest.raises(ValueError):
        small.split(1.0)


# ---------------------------------------------------------------- NPZ


def test_npz_round_trip_every_key(tmp_path: Path, small: PtychoData) -> None:
    path = tmp_path / "scan.npz"
    save_npz(path, small)
    assert sorted(os.listdir(tmp_path)) == ["scan.npz"]  # no temp file left behind
    with np.load(path, allow_pickle=False) as raw:
        assert set(raw.files) == {"diffraction", "probeGuess", "objectGuess", "xcoords", "ycoords", "Y", "scan_index"}
        assert raw["diffraction"].dtype == np.float32 and raw["Y"].dtype == np.complex64
    back = load_npz(path)
    for name in ("diffraction", "xcoords", "ycoords", "probe", "object", "patches", "scan_index"):
        a, b = getattr(small, name), getattr(back, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    save_npz(path, small.subset([0, 1]))  # overwrite in place
    assert load_npz(path).n == 2


def _write(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _minimal(n: int = 5, N: int = 8) -> dict:
    rng = np.random.default_rng(0)
    return dict(
        diffraction=rng.uniform(0, 1, (n, N, N)).astype(np.float32),
        probeGuess=np.ones((N, N), np.complex64),
        xcoords=np.arange(n, dtype=float),
        ycoords=np.arange(n, dtype=float),
    )


def test_npz_missing_key_message(tmp_path: Path) -> None:
    arrays = _minimal(n=412)
    del arrays["xcoords"]
    with pytest.raises(ValueError, match=r"missing 'xcoords'.*\(412,\)"):
        load_npz(_write(tmp_path / "a.npz", **arrays))
    arrays = _minimal()
    del arrays["diffraction"]
    with pytest.raises(ValueError, match="missing 'diffraction'"):
        load_npz(_write(tmp_path / "b.npz", **arrays))


def test_npz_wrong_shape_message(tmp_path: Path) -> None:
    arrays = {**_minimal(), "probeGuess": np.ones((4, 4), np.complex64)}
    with pytest.raises(ValueError, match=r"'probeGuess' has shape \(4, 4\).*\(8, 8\)"):
        load_npz(_write(tmp_path / "a.npz", **arrays))
    arrays = {**_minimal(), "Y": np.ones((5, 8, 4), np.complex64)}
    with pytest.raises(ValueError, match=r"'Y' has shape \(5, 8, 4\)"):
        load_npz(_write(tmp_path / "b.npz", **arrays))


def test_npz_legacy_diff3d_and_optional_keys(tmp_path: Path) -> None:
    arrays = _minimal()
    arrays["diff3d"] = arrays.pop("diffraction")
    d = load_npz(_write(tmp_path / "a.npz", **arrays, xcoords_start=np.zeros(5)))
    np.testing.assert_array_equal(d.diffraction, arrays["diff3d"])
    assert d.object is None and d.patches is None and d.scan_index is None


def test_npz_counts_takes_sqrt_and_normalises(tmp_path: Path) -> None:
    arrays = _minimal()
    counts = np.random.default_rng(1).poisson(50.0, (5, 8, 8)).astype(np.float32)
    arrays["diffraction"] = counts
    d = load_npz(_write(tmp_path / "a.npz", **arrays), counts=True)
    ratio = d.diffraction / np.sqrt(counts)
    assert np.allclose(ratio[counts > 0], ratio[counts > 0].flat[0], rtol=1e-5)  # sqrt, one factor
    assert np.mean(np.sum(d.diffraction.astype(float) ** 2, axis=(1, 2))) == pytest.approx(16.0, rel=1e-5)


def test_npz_units_are_detected_and_normalised_the_same_way(tmp_path: Path) -> None:
    """Counts, sqrt(counts) and a declared unit all give the same normalised data and photon count."""
    rng = np.random.default_rng(2)
    counts = rng.poisson(rng.uniform(0, 400, (5, 8, 8))).astype(np.float32)
    base = _minimal()
    got = {}
    for name, values, kwargs in (("counts", counts, {}), ("photons", np.sqrt(counts), {}),
                                 ("declared", np.sqrt(counts), {"units": "photons"}),
                                 ("legacy flag", counts, {"counts": True})):
        arrays = {**base, "diffraction": values}
        got[name] = load_npz(_write(tmp_path / f"{name}.npz", **arrays), **kwargs)
    for d in got.values():
        np.testing.assert_allclose(d.diffraction, got["counts"].diffraction, rtol=1e-5, atol=1e-6)
        assert d.nphotons == pytest.approx(float(np.mean(counts.sum(axis=(1, 2)))), rel=1e-6)
    # a normalised amplitude keeps its values and has no photon count
    d = load_npz(_write(tmp_path / "norm.npz", **base))
    np.testing.assert_array_equal(d.diffraction, base["diffraction"])
    assert d.nphotons is None


def test_npz_detect_units() -> None:
    rng = np.random.default_rng(3)
    counts = rng.poisson(30.0, (4, 16, 16)).astype(np.float64)
    assert detect_units(counts) == "counts"
    assert detect_units(np.sqrt(counts).astype(np.float32)) == "photons"
    assert detect_units(np.sqrt(counts) / 7.3) == "normalised"


def test_npz_rescaled_counts_are_refused_unless_the_units_are_declared(tmp_path: Path) -> None:
    """Background-subtracted counts (not whole, far above the normalised scale): refused, with the options."""
    values = np.random.default_rng(4).uniform(900, 1100, (5, 8, 8)).astype(np.float32)
    path = _write(tmp_path / "a.npz", **{**_minimal(), "diffraction": values})
    with pytest.raises(ValueError, match=r"does not look like a normalised amplitude.*units='counts' or "
                                         r"units='photons'.*units='normalised'"):
        load_npz(path)
    d = load_npz(path, units="counts")  # told: taken as counts
    assert d.nphotons == pytest.approx(float(np.mean(values.astype(np.float64).sum(axis=(1, 2)))), rel=1e-6)
    with pytest.warns(UserWarning, match="units='counts' or units='photons'"):  # told otherwise: used, with a warning
        d = load_npz(path, units="normalised")
    np.testing.assert_array_equal(d.diffraction, values)


def test_npz_raw_counts_are_detected_not_read_as_amplitudes(tmp_path: Path) -> None:
    counts = np.random.default_rng(5).poisson(200.0, (5, 8, 8)).astype(np.float32)
    d = load_npz(_write(tmp_path / "a.npz", **{**_minimal(), "diffraction": counts}))
    assert d.nphotons == pytest.approx(float(counts.sum(axis=(1, 2)).mean()), rel=1e-6)
    np.testing.assert_allclose(np.mean(np.sum(d.diffraction.astype(float) ** 2, axis=(1, 2))), 16.0, rtol=1e-5)


def test_npz_all_zero_or_constant_patterns_are_refused_with_their_indices(tmp_path: Path) -> None:
    arrays = _minimal()
    arrays["diffraction"][1] = 0.0
    arrays["diffraction"][3] = 0.25
    with pytest.raises(ValueError, match=r"2 of 5 patterns are all zero or constant \(indices \[1, 3\]\).*Remove"):
        load_npz(_write(tmp_path / "a.npz", **arrays))
    arrays["diffraction"][:] = 0.0
    with pytest.raises(ValueError, match=r"every one of the 5 patterns is all zero or constant"):
        load_npz(_write(tmp_path / "b.npz", **arrays))


def test_npz_positions_in_metres_are_refused(tmp_path: Path) -> None:
    arrays = _minimal()
    arrays["xcoords"] = np.arange(5) * 50e-9  # 50 nm steps, stored in metres
    arrays["ycoords"] = np.zeros(5)
    with pytest.raises(ValueError, match=r"span only 2e-07 pixels.*look like metres.*positions_from_metres"):
        load_npz(_write(tmp_path / "a.npz", **arrays))


@pytest.mark.parametrize("outlier", [3e4, 1e9])
def test_npz_one_outlier_position_is_refused_by_index(tmp_path: Path, outlier: float) -> None:
    arrays = _minimal(n=40)
    arrays["xcoords"] = np.tile(np.arange(8.0), 5) * 4
    arrays["ycoords"] = np.repeat(np.arange(5.0), 8) * 4
    arrays["xcoords"][17] = outlier
    with pytest.raises(ValueError, match=r"1 of 40 scan position\(s\) \(indices 17; e.g. x=.*\) lie .* pixels in x "
                                         r"from the rest.*an outlier or a wrong unit.*Drop those frames"):
        load_npz(_write(tmp_path / "a.npz", **arrays))


def test_npz_scan_in_nanometres_read_as_pixels_is_refused(tmp_path: Path) -> None:
    arrays = _minimal(n=400)
    grid = np.arange(20.0) * 1e3  # a 20 × 20 raster with 1000-pixel steps: nanometres read as pixels?
    arrays["xcoords"], arrays["ycoords"] = np.tile(grid, 20), np.repeat(grid, 20)
    with pytest.raises(ValueError, match=r"lie 1000 pixels"):
        load_npz(_write(tmp_path / "a.npz", **arrays))


def test_npz_probe_at_an_instrument_scale_is_normalised_with_the_data(tmp_path: Path) -> None:
    data = simulate_scan(N=16, object_size=48, seed=1, nphotons=1e6)
    counts = np.round((data.diffraction.astype(np.float64) * 1e6**0.5 / 8) ** 2)
    base = dict(diffraction=np.sqrt(counts).astype(np.float32), xcoords=data.xcoords, ycoords=data.ycoords)
    # probe in the data's own units (Σ|P|² ≈ photons per frame): scaled by the same factor as the data
    probe_file = data.probe * 1e6**0.5 / 8
    consistent = load_npz(_write(tmp_path / "a.npz", **base, probeGuess=probe_file))
    ratio_file = np.sum(np.abs(probe_file) ** 2) / np.mean(counts.sum(axis=(1, 2)))
    ratio = np.sum(np.abs(consistent.probe) ** 2) / np.mean(np.sum(consistent.diffraction.astype(float) ** 2, (1, 2)))
    assert ratio == pytest.approx(ratio_file, rel=1e-4)  # probe and data scaled by one factor
    # probe at an arbitrary absolute scale (Σ|P|² = 1e14): set to the brightest patterns' energy
    arbitrary = load_npz(_write(tmp_path / "b.npz", **base, probeGuess=data.probe * 1e7))
    energy = np.sum(arbitrary.diffraction.astype(np.float64) ** 2, axis=(1, 2))
    assert np.sum(np.abs(arbitrary.probe) ** 2) == pytest.approx(np.percentile(energy, 99.5), rel=1e-4)
    assert np.sum(np.abs(arbitrary.probe) ** 2) == pytest.approx(np.sum(np.abs(data.probe) ** 2), rel=0.2)


def test_npz_position_centre_convention(tmp_path: Path) -> None:
    arrays = _minimal()
    default = load_npz(_write(tmp_path / "a.npz", **arrays))
    np.testing.assert_array_equal(default.xcoords, arrays["xcoords"])
    legacy = load_npz(tmp_path / "a.npz", position_centre="N/2")
    np.testing.assert_array_equal(legacy.xcoords, arrays["xcoords"] - 0.5)
    with pytest.raises(ValueError, match="centre"):
        load_npz(tmp_path / "a.npz", position_centre="middle")


def test_npz_rejects_nan_and_negative(tmp_path: Path) -> None:
    arrays = _minimal()
    arrays["diffraction"][3, 0, 0] = np.nan
    arrays["diffraction"][1, 2, 2] = -1.0
    with pytest.raises(ValueError, match=r"1 NaN.*1 negative.*\[1, 3\]"):
        load_npz(_write(tmp_path / "a.npz", **arrays))


def test_npz_rejects_non_npz(tmp_path: Path) -> None:
    text = tmp_path / "notes.npz"
    text.write_text("not a zip archive\n")
    with pytest.raises(ValueError, match="not an NPZ"):
        load_npz(text)
    single = tmp_path / "one.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="not an NPZ"):
        load_npz(single)
    with pytest.raises(ValueError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, **_minimal(), Y=np.array([object()] * 5, dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        load_npz(pickled)


# ---------------------------------------------------------------- grouping


def test_group_gridsize1_identity(small: PtychoData) -> None:
    idx = group_neighbors(small.xcoords, small.ycoords, 1)
    np.testing.assert_array_equal(idx, np.arange(small.n)[:, None])
    g = make_groups(small, 1)
    assert isinstance(g, GroupedData) and (g.B, g.C, g.N, g.gridsize) == (small.n, 1, 16, 1)
    assert np.all(g.offsets == 0)
    np.testing.assert_array_equal(g.diffraction[:, 0], small.diffraction)


def test_group_gridsize2_nearest_neighbours() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.uniform(0, 100, (2, 300))
    idx = group_neighbors(x, y, 2)
    assert idx.shape == (300, 4) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx[:, 0], np.arange(300))
    assert all(len(set(row)) == 4 for row in idx.tolist())
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    np.fill_diagonal(d, -1)
    brute = np.argsort(d, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(idx, brute)


def test_group_ties_on_a_raster_are_deterministic() -> None:
    x, y = scan_positions(64, 16, "grid", step=4)
    idx = group_neighbors(x, y, 2)
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    np.fill_diagonal(d, -1)
    np.testing.assert_array_equal(idx, np.argsort(d, axis=1, kind="stable")[:, :4])


def test_make_groups_offsets_and_gather(small: PtychoData) -> None:
    g = make_groups(small, 2, n_groups=20, seed=3)
    assert g.diffraction.shape == (20, 4, 16, 16) and g.offsets.shape == (20, 4, 1, 2)
    assert g.offsets.dtype == np.float32 and g.positions.dtype == np.float64
    np.testing.assert_allclose(g.offsets.sum(axis=1), 0, atol=1e-4)
    np.testing.assert_array_equal(g.positions[..., 0], small.xcoords[g.indices])
    np.testing.assert_array_equal(g.positions[..., 1], small.ycoords[g.indices])
    np.testing.assert_array_equal(g.patches, small.patches[g.indices])
    np.testing.assert_allclose(
        g.offsets[:, :, 0, :], g.positions - g.positions.mean(axis=1, keepdims=True), atol=1e-4
    )
    again = make_groups(small, 2, n_groups=20, seed=3)
    np.testing.assert_array_equal(g.indices, again.indices)
    g3 = make_groups(small, 3)
    assert g3.C == 9 and g3.gridsize == 3


def test_group_errors() -> None:
    x = y = np.arange(3, dtype=float)
    with pytest.raises(ValueError, match="gridsize"):
        group_neighbors(x, y, 0)
    with pytest.raises(ValueError, match="C=4.*n=3"):
        group_neighbors(x, y, 2)
    with pytest.raises(ValueError, match="n_groups"):
        group_neighbors(x, y, 1, n_groups=4)
    with pytest.raises(ValueError, match="differ"):
        group_neighbors(x, y[:2], 1)


def test_group_large_n_is_fast() -> None:
    import time

    x, y = np.random.default_rng(5).uniform(0, 2000, (2, 5000))
    t0 = time.perf_counter()
    idx = group_neighbors(x, y, 3)
    assert idx.shape == (5000, 9)
    assert time.perf_counter() - t0 < 3.0
