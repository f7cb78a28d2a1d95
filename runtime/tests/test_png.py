"""``write_png``'s colour ranges come from the scanned interior, not from the rim's undetermined pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ptycho_runtime.files.png import png_panels, scanned_pixels, write_png
from ptycho_runtime.reconstruction.stitching import Reconstruction

SIZE = 80


def _recon_with_hot_edges() -> Reconstruction:
    """Amplitude 0.5–1 and phase ±0.8 rad inside; the dimly lit rim holds a few amplitudes of 40 and phases near π."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    r = np.hypot(xx, yy)
    weight = np.clip(1.2 - r / 30.0, 0.0, 1.0) * 50.0  # 0 beyond r = 36, a dim rim from r = 30 on
    amp = rng.uniform(0.5, 1.0, (SIZE, SIZE))
    phase = rng.uniform(-0.8, 0.8, (SIZE, SIZE)) + 0.3  # a global offset the figure removes
    rim = np.flatnonzero(((weight > 0) & (weight < 0.15 * weight.max())).ravel())
    hot = rng.choice(rim, 12, replace=False)
    amp.flat[hot] = 40.0
    phase.flat[hot] = 3.1
    obj = amp * np.exp(1j * phase)
    obj[weight == 0] = 0
    return Reconstruction(obj, weight, np.arange(SIZE, dtype=float), np.arange(SIZE, dtype=float))


def test_the_colour_range_is_set_by_the_scanned_interior_not_by_edge_artefacts() -> None:
    recon = _recon_with_hot_edges()
    panels = png_panels(recon)
    lo, hi = panels.amplitude_limits
    assert 0.5 <= lo < 0.55 and 0.95 < hi <= 1.0  # 1st–99th percentile of U(0.5, 1); the 40s would give hi = 40
    plo, phi = panels.phase_limits
    assert -0.8 <= plo < -0.7 and 0.7 < phi <= 0.8  # the interior's ±0.8 rad once its offset (+0.3) is removed
    assert panels.phase_offset == pytest.approx(0.3, abs=0.05)


def test_pixels_outside_the_scanned_area_are_masked_not_coloured() -> None:
    recon = _recon_with_hot_edges()
    panels = png_panels(recon)
    scanned = scanned_pixels(recon)
    np.testing.assert_array_equal(scanned, recon.weight >= 0.2 * recon.weight.max())
    for img in (panels.amplitude, panels.phase):
        np.testing.assert_array_equal(np.ma.getmaskarray(img), ~scanned)
    assert not np.any(scanned & (np.abs(recon.object) > 10))  # the hot rim pixels are among the blank ones
    assert np.any(recon.covered & ~scanned)  # covered but dim: blank too


def test_a_few_outliers_inside_the_scanned_area_do_not_set_the_range_either() -> None:
    recon = _recon_with_hot_edges()
    inside = np.flatnonzero(scanned_pixels(recon).ravel())
    recon.object.flat[inside[:: max(1, inside.size // 20)][:20]] = 25.0  # 20 of ~2,800 pixels: under 1%
    assert png_panels(recon).amplitude_limits[1] <= 1.0


def test_an_empty_or_flat_reconstruction_still_gets_a_colour_range() -> None:
    empty = Reconstruction(np.zeros((8, 8), complex), np.zeros((8, 8)), np.arange(8.0), np.arange(8.0))
    panels = png_panels(empty)
    assert not panels.scanned.any() and panels.amplitude_limits[1] > panels.amplitude_limits[0]
    flat = Reconstruction(np.full((8, 8), 0.7 + 0j), np.ones((8, 8)), np.arange(8.0), np.arange(8.0))
    lo, hi = png_panels(flat).amplitude_limits
    assert lo < 0.7 < hi and hi - lo < 0.01


def test_write_png_draws_the_panels(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "r.png"
    write_png(path, _recon_with_hot_edges(), "hot edges")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
