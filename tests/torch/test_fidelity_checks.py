"""Checks that can fail before any tuning (issue 9): the physics against an independent textbook
model at absolute scale, the data chain from a user's file to the loss, and the true object as the
loss's minimum."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402

from ptycho_export.data import load_npz, make_groups  # noqa: E402
from ptycho_export.data.realistic import dead_leaves_object, fermat_spiral, zone_plate_probe  # noqa: E402
from ptycho_export.physics import PhysicsForward, poisson_nll  # noqa: E402
from ptycho_runtime.files.npz import write_npz_arrays  # noqa: E402

N = 64


def textbook_intensity(obj: np.ndarray, probe: np.ndarray, x: float, y: float) -> np.ndarray:
    """Far-field intensity of the frame centred at object pixel (x, y), written from the textbook.

    Frame pixel (N−1)/2 sits on (x, y) (whole-pixel starts only); DC at pixel N//2 via
    fftshift(fft2(ifftshift(ψ))); unitary normalisation 1/N so Σ intensity = Σ|ψ|² (Parseval).
    """
    r0, c0 = y - (N - 1) / 2, x - (N - 1) / 2
    assert r0 == int(r0) and c0 == int(c0)
    psi = obj[int(r0):int(r0) + N, int(c0):int(c0) + N] * probe
    field = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(psi))) / N
    return np.abs(field) ** 2


def _scene(probe_scale: float):
    probe = zone_plate_probe(N).astype(np.complex128) * probe_scale
    obj = dead_leaves_object(160, seed=5).astype(np.complex128)
    x, y = fermat_spiral(24, 9.0, (79.5, 79.5))
    x, y = np.round(x) + 0.5, np.round(y) + 0.5  # whole-pixel frame starts: the textbook model needs no interpolation
    return obj, probe, x, y


@pytest.mark.parametrize("probe_scale", [1.0, 3.7e3, 1e7])
@pytest.mark.parametrize("use_matmul", [False, True])
def test_forward_model_matches_textbook_at_any_absolute_scale(probe_scale, use_matmul):
    obj, probe, x, y = _scene(probe_scale)
    expected = np.stack([textbook_intensity(obj, probe, xi, yi) for xi, yi in zip(x, y, strict=True)])
    from ptycho_export.data import extract_patches

    patches = extract_patches(obj, x, y, N)
    physics = PhysicsForward(N, 1, probe.astype(np.complex64))
    physics.far_field.use_matmul = use_matmul
    with torch.no_grad():
        got = physics(torch.from_numpy(patches.real[:, None].copy()), torch.from_numpy(patches.imag[:, None].copy()),
                      torch.zeros(len(x), 1, 1, 2))[:, 0].double().numpy()
    rel = np.max(np.abs(got - expected)) / np.max(expected)
    assert rel <= 1e-3, rel
    assert np.sum(got) == pytest.approx(np.sum(expected), rel=1e-4)


def test_file_to_loss_chain_reproduces_measured_intensities(tmp_path):
    """A user's file (sqrt of photon intensities, probe in its own units) → the model's predicted
    photon intensities of the true object equal the file's intensities to 1e-3."""
    obj, probe, x, y = _scene(1.0)
    photons_per_frame = 1e6
    raw = np.stack([textbook_intensity(obj, probe, xi, yi) for xi, yi in zip(x, y, strict=True)])
    k = photons_per_frame / np.mean(raw.sum(axis=(1, 2)))
    intensities = raw * k  # noiseless photon intensities; the probe in the same units is probe·sqrt(k)
    path = tmp_path / "scan.npz"
    write_npz_arrays(path, {"diffraction": np.sqrt(intensities).astype(np.float32),
                            "probeGuess": (probe * math.sqrt(k)).astype(np.complex64), "xcoords": x, "ycoords": y})
    data = load_npz(path, units="photons")
    assert data.nphotons == pytest.approx(photons_per_frame, rel=1e-5)
    scale = math.sqrt(data.nphotons) / (N / 2)  # the intensity scale training uses
    from ptycho_export.data import extract_patches

    patches = extract_patches(obj, data.xcoords, data.ycoords, N)
    physics = PhysicsForward(N, 1, data.probe)
    with torch.no_grad():
        pred = physics(torch.from_numpy(patches.real[:, None].copy()), torch.from_numpy(patches.imag[:, None].copy()),
                       torch.zeros(len(x), 1, 1, 2))[:, 0].double().numpy() * scale**2
    assert np.max(np.abs(pred - intensities)) / np.max(intensities) <= 1e-3
    observed = (data.diffraction.astype(np.float64) * scale) ** 2
    assert np.max(np.abs(observed - intensities)) / np.max(intensities) <= 1e-5


@pytest.mark.parametrize("gridsize", [1, 2])
def test_true_object_is_a_minimum_of_the_training_loss(gridsize):
    """Oracle: feed the physics the true patches; the Poisson loss on noisy counts is lowest there
    (any perturbation — amplitude, phase, shift, a flat object — scores worse)."""
    obj, probe, x, y = _scene(1.0)
    from ptycho_export.data import PtychoData, extract_patches, far_field_amplitude

    scale = math.sqrt(1e6) / (N / 2)
    probe = (probe * (N / 2) / np.sqrt(np.sum(np.abs(probe) ** 2))).astype(np.complex64)
    patches = extract_patches(obj, x, y, N)
    counts = np.random.default_rng(0).poisson((far_field_amplitude(patches, probe).astype(np.float64) * scale) ** 2)
    data = PtychoData(diffraction=(np.sqrt(counts) / scale).astype(np.float32), xcoords=x, ycoords=y, probe=probe,
                      object=obj.astype(np.complex64))
    groups = make_groups(data, gridsize)
    physics = PhysicsForward(N, gridsize, probe)
    observed = torch.from_numpy((groups.diffraction.astype(np.float64) * scale) ** 2).float()
    offsets = torch.from_numpy(groups.offsets)

    def loss(patch_stack: np.ndarray) -> float:
        with torch.no_grad():
            pred = physics(torch.from_numpy(patch_stack.real.copy()), torch.from_numpy(patch_stack.imag.copy()),
                           offsets) * scale**2
        return float(poisson_nll(pred, observed))

    true = extract_patches(obj, groups.positions[..., 0].ravel(), groups.positions[..., 1].ravel(), N)
    true = true.reshape(groups.B, groups.C, N, N)
    best = loss(true)
    rng = np.random.default_rng(1)
    worse = {
        "amplitude ×0.9": true * 0.9,
        "amplitude ×1.1": true * 1.1,
        "phase noise": true * np.exp(0.2j * rng.standard_normal(true.shape)),
        "phase ×0.7": np.abs(true) * np.exp(0.7j * np.angle(true)),
        "flat object": np.full_like(true, np.mean(np.abs(true))),
        "shifted 1 px": np.roll(true, 1, axis=-1),
    }
    for name, candidate in worse.items():
        assert loss(candidate.astype(np.complex64)) > best + 1e-3, name
    # Near the noise floor (half the Poisson deviance per pixel, ~0.5 on counted pixels). The overlap
    # constraint (gridsize 2) moves patches by sub-pixel offsets with bilinear interpolation, there and
    # back, which blurs even the true object: its floor is higher (measured 1.5 here).
    assert best < (1.0 if gridsize == 1 else 2.0)


@pytest.mark.parametrize("output_mode", ["amp_phase", "real_imag"])
def test_backprojection_model_round_trips_through_bundle_graphs_and_runtime(tmp_path, output_mode):
    """input_backprojection: saved, rebuilt from params (CONFIG-001), exported with parity, run by the runtime."""
    import ptycho_runtime as pr
    from ptycho_export.model_manager import load_torch_bundle
    from ptycho_export.testing import make_test_bundle
    from ptycho_runtime.files.npz import read_npz_arrays

    path = make_test_bundle(tmp_path / "bp", gridsize=2, n_positions=24, input_backprojection=True,
                            output_mode=output_mode)
    model, params = load_torch_bundle(path, model_name="diffraction_to_obj")
    assert params["input_backprojection"] is True and model.backprojection is not None
    assert model.generator.encoder.stages[0].conv1.in_channels == 12  # 4 amplitudes + 4 × (Re, Im) of O₀
    scan = read_npz_arrays(path.parent / "scan.npz")
    bundle = pr.load_bundle(path)
    x = scan["diffraction"][:8]
    from ptycho_export.data import PtychoData, make_groups

    groups = make_groups(PtychoData(diffraction=x, xcoords=scan["xcoords"][:8], ycoords=scan["ycoords"][:8],
                                    probe=scan["probeGuess"]), 2)
    with torch.no_grad():
        eager = model(torch.from_numpy(groups.diffraction * np.float32(bundle.intensity_scale))).numpy()
    got = bundle.predict(groups.diffraction)
    assert np.abs(got - eager).max() <= 1e-4 * max(1.0, np.abs(eager).max())


def test_untrained_residual_model_outputs_the_backprojection():
    """real_imag + input_backprojection: the network learns a correction to O₀ and starts at exactly O₀."""
    from ptycho_export import params
    from ptycho_export.model import BackProjection, create_torch_model_with_gridsize

    probe = zone_plate_probe(N)
    p = dict(params.DEFAULTS, n_filters_scale=1, intensity_scale=10.0, probe=probe, output_mode="real_imag",
             input_backprojection=True)
    d2o = create_torch_model_with_gridsize(2, N, p)["diffraction_to_obj"]
    x = torch.rand(3, 4, N, N) * 20
    with torch.no_grad():
        out = d2o(x)
        o0 = BackProjection(probe)(x / 10.0)
    np.testing.assert_allclose(out.real.numpy(), o0[:, 4:8].numpy(), atol=1e-6)
    np.testing.assert_allclose(out.imag.numpy(), o0[:, 8:].numpy(), atol=1e-6)
    assert float(torch.abs(o0[:, 4:]).max()) > 0.1  # a real signal, not zeros
