"""The NPZ reader's probe: (modes, N, N) stacks, the unnormalised-FFT convention, and a scale decision that is logged.

Synthetic scans written here with ``write_npz_arrays``: each frame is the
far field of the probe times an object patch of known transmission, so the
probe scale the reader picks can be checked against the physics (the
project's model |fft2(P·O)|/N must give back the normalised amplitudes).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from ptycho_runtime.files.npz import read_npz_arrays, write_npz_arrays
from ptycho_runtime.reconstruction.probe_scale import (
    DATA_UNITS,
    UNNORMALISED_FFT_UNITS,
    normalise_probe,
    scale_is_relative,
)

N = 32
N_FRAMES = 40


def _probe(scale: float) -> np.ndarray:
    """A smooth, lopsided complex probe with Σ|P|² = ``scale``."""
    yy, xx = np.mgrid[:N, :N] - (N - 1) / 2
    p = np.exp(-(xx**2 + (1.4 * yy) ** 2) / (2 * 4.0**2)) * np.exp(1j * 0.03 * (xx**2 - yy**2))
    return p * np.sqrt(scale / np.sum(np.abs(p) ** 2))


def _patches(seed: int = 0) -> np.ndarray:
    """Object patches with transmission 0.55–0.9 (never 1: the brightest-frame rule would be exact otherwise)."""
    rng = np.random.default_rng(seed)
    amp = rng.uniform(0.55, 0.9, (N_FRAMES, 1, 1)) * (1 + 0.05 * rng.standard_normal((N_FRAMES, N, N)))
    return np.clip(amp, 0.3, 0.95) * np.exp(1j * rng.uniform(-0.5, 0.5, (N_FRAMES, N, N)))


def _scan(tmp_path: Path, probe_in_file: np.ndarray, counts: np.ndarray, name: str = "scan.npz", **extra) -> Path:
    side = int(np.ceil(np.sqrt(N_FRAMES)))
    x = (np.arange(N_FRAMES) % side) * 8.0 + N
    y = (np.arange(N_FRAMES) // side) * 8.0 + N
    path = tmp_path / name
    write_npz_arrays(path, {"diffraction": counts, "probeGuess": probe_in_file, "xcoords": x, "ycoords": y, **extra})
    return path


def _counts(exit_wave_probe: np.ndarray, patches: np.ndarray, unnormalised_fft: bool, seed: int = 1) -> np.ndarray:
    """Poisson counts of |fft2(P·O)|²: divided by N² (the data's units) or not (pty-chi's unnormalised FFT)."""
    far = np.abs(np.fft.fft2(exit_wave_probe * patches)) ** 2
    if not unnormalised_fft:
        far = far / N**2
    return np.random.default_rng(seed).poisson(far).astype(np.float64)


def _model_energy_ratio(arrays: dict, patches: np.ndarray) -> float:
    """Mean over frames of Σ(model amplitude)² / Σ(normalised amplitude)², model |fft2(P·O)|/N: 1 at the right scale."""
    model = np.sum(np.abs(arrays["probeGuess"].astype(np.complex128) * patches) ** 2, axis=(1, 2))
    measured = np.sum(arrays["diffraction"].astype(np.float64) ** 2, axis=(1, 2))
    return float(np.mean(model / measured))


# --------------------------------------------------------------------------- (modes, N, N) probe stacks


def test_a_single_mode_stack_reads_as_the_plain_probe(tmp_path: Path) -> None:
    patches, probe = _patches(), _probe(1e6)
    counts = _counts(probe, patches, unnormalised_fft=False)
    plain = read_npz_arrays(_scan(tmp_path, probe, counts, "plain.npz"))
    stacked = read_npz_arrays(_scan(tmp_path, probe[None], counts, "stacked.npz"))
    assert stacked["probeGuess"].shape == (N, N)
    np.testing.assert_array_equal(stacked["probeGuess"], plain["probeGuess"])
    assert stacked["probe_scale"] == plain["probe_scale"] == DATA_UNITS


def test_a_longer_stack_uses_mode_zero_and_warns_how_many_modes_were_dropped(tmp_path: Path, caplog) -> None:
    patches, probe = _patches(), _probe(1e6)
    counts = _counts(probe, patches, unnormalised_fft=False)
    plain = read_npz_arrays(_scan(tmp_path, probe, counts, "plain.npz"))
    modes = np.stack([probe, 0.3 * probe[::-1], 0.1 * probe[:, ::-1]])
    with caplog.at_level(logging.WARNING, logger="ptycho_runtime"):
        stacked = read_npz_arrays(_scan(tmp_path, modes, counts, "modes.npz"))
    np.testing.assert_array_equal(stacked["probeGuess"], plain["probeGuess"])
    dropped = [r for r in caplog.records if "mode" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(dropped) == 1 and "3 probe modes" in dropped[0].getMessage()
    assert "dropping the other 2" in dropped[0].getMessage()
    assert dropped[0].name.startswith("ptycho_runtime")


@pytest.mark.parametrize("shape", [(2, N // 2, N // 2), (0, N, N), (1, 1, N, N)])
def test_a_probe_stack_of_the_wrong_frame_size_is_refused_naming_both_layouts(tmp_path: Path, shape) -> None:
    patches, probe = _patches(), _probe(1e6)
    counts = _counts(probe, patches, unnormalised_fft=False)
    with pytest.raises(ValueError, match=r"'probeGuess' has shape .*expected \(N, N\) or \(modes, N, N\)"):
        read_npz_arrays(_scan(tmp_path, np.ones(shape, np.complex64), counts))


def test_ptychodus_export_layout_reads_as_counts(tmp_path: Path) -> None:
    """ptychodus's ``save_ptychopinn_training_data``: detector counts in ``diff3d``, the probe as a (1, N, N) stack."""
    patches, probe = _patches(), _probe(1e6)
    counts = _counts(probe, patches, unnormalised_fft=False)
    side = int(np.ceil(np.sqrt(N_FRAMES)))
    x = (np.arange(N_FRAMES) % side) * 8.0 + N
    y = (np.arange(N_FRAMES) // side) * 8.0 + N
    path = tmp_path / "ptychopinn_training_data.npz"
    write_npz_arrays(path, {"diff3d": counts, "probeGuess": probe[None] * 1e3, "xcoords": x, "ycoords": y,
                            "xcoords_start": x, "ycoords_start": y, "bad_pixels": np.zeros((N, N), bool),
                            "scan_index": np.zeros(N_FRAMES, np.int64)})
    arrays = read_npz_arrays(path)
    assert arrays["units"] == "counts"
    assert arrays["nphotons"] == pytest.approx(np.mean(counts.sum(axis=(1, 2))))
    assert arrays["diffraction"].shape == (N_FRAMES, N, N) and arrays["probeGuess"].shape == (N, N)
    lit = counts > 0
    factor = arrays["diffraction"][lit] / np.sqrt(counts[lit])
    np.testing.assert_allclose(factor, factor[0], rtol=1e-5)  # sqrt of the counts, one normalisation factor


# --------------------------------------------------------------------------- the unnormalised-FFT convention


@pytest.mark.parametrize("as_photons", [False, True])
def test_a_probe_in_the_unnormalised_fft_convention_keeps_its_absolute_scale(tmp_path: Path, as_photons) -> None:
    """pty-chi: Σ counts = N²·Σ|P·O|². Its probe, times N, is the project's; the object's true transmission follows."""
    patches, probe = _patches(), _probe(500.0)  # pty-chi's scale: Σ|P|² of a few hundred for 1e6-photon frames
    counts = _counts(probe, patches, unnormalised_fft=True)
    data = np.sqrt(counts).astype(np.float32) if as_photons else counts
    arrays = read_npz_arrays(_scan(tmp_path, probe, data))
    assert arrays["units"] == ("photons" if as_photons else "counts")
    assert arrays["probe_scale"] == UNNORMALISED_FFT_UNITS
    assert _model_energy_ratio(arrays, patches) == pytest.approx(1.0, abs=0.01)


def test_the_brightest_frame_rule_is_what_the_unnormalised_probe_got_before(tmp_path: Path) -> None:
    """The same probe at a scale of neither convention: rescaled, and the amplitude is then off by the transmission."""
    patches, probe = _patches(), _probe(500.0)
    counts = _counts(probe, patches, unnormalised_fft=True)
    arrays = read_npz_arrays(_scan(tmp_path, probe * 1e4, counts))
    assert scale_is_relative(arrays["probe_scale"])
    assert _model_energy_ratio(arrays, patches) < 0.9  # brightest frames taken as transmission 1; they are ≤ 0.95


def test_a_probe_in_the_data_units_is_still_scaled_with_the_data(tmp_path: Path) -> None:
    patches, probe = _patches(), _probe(1e6)
    counts = _counts(probe, patches, unnormalised_fft=False)
    arrays = read_npz_arrays(_scan(tmp_path, probe, counts))
    assert arrays["probe_scale"] == DATA_UNITS
    assert _model_energy_ratio(arrays, patches) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("ratio, label", [(0.5, DATA_UNITS), (0.5 * N**2, UNNORMALISED_FFT_UNITS),
                                          (30.0, "rescaled"), (0.5 * N**4, "rescaled"), (1e-7, "rescaled")])
def test_normalise_probe_tells_the_conventions_apart_by_the_energy_ratio(ratio: float, label: str) -> None:
    diffraction = np.full((4, N, N), 1.0)
    p = _probe(N * N / ratio)
    out, got = normalise_probe(p, diffraction, factor=2.0)
    assert got.startswith(label)
    scale = np.sqrt(np.sum(np.abs(out.astype(np.complex128)) ** 2) / np.sum(np.abs(p) ** 2))
    brightest = 2.0 * np.sqrt(N * N / np.sum(np.abs(p) ** 2))  # Σ|P|² set to the (uniform) frames' energy
    expected = {DATA_UNITS: 2.0, UNNORMALISED_FFT_UNITS: 2.0 * N}.get(label, brightest)
    assert scale == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- the scale decision is logged


def test_a_rescaled_probe_is_a_warning_that_the_amplitude_is_relative(tmp_path: Path, caplog) -> None:
    patches, probe = _patches(), _probe(1e6)
    counts = _counts(probe, patches, unnormalised_fft=False)
    path = _scan(tmp_path, probe * 1e5, counts)
    with caplog.at_level(logging.INFO, logger="ptycho_runtime"):
        arrays = read_npz_arrays(path)
    records = [r for r in caplog.records if "probeGuess" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert str(path) in message and arrays["probe_scale"] in message
    assert "relative to the brightest frames" in message


@pytest.mark.parametrize("scale, unnormalised", [(1e6, False), (500.0, True)])
def test_a_kept_probe_scale_is_logged_at_info(tmp_path: Path, caplog, scale: float, unnormalised: bool) -> None:
    patches, probe = _patches(), _probe(scale)
    counts = _counts(probe, patches, unnormalised_fft=unnormalised)
    with caplog.at_level(logging.INFO, logger="ptycho_runtime"):
        arrays = read_npz_arrays(_scan(tmp_path, probe, counts))
    records = [r for r in caplog.records if "probeGuess" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.INFO]
    assert arrays["probe_scale"] in records[0].getMessage()
