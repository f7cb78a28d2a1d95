"""Physics metadata in the bundle (optional, validated) and the host checks against it."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import ptycho_runtime as pr
from ptycho_runtime import format as fmt
from ptycho_runtime.inference.compatibility import object_pixel_size

INSTRUMENT = {"photon_energy_eV": 10_000.0, "detector_distance_m": 2.0, "detector_pixel_size_m": 75e-6}


def _with_physics(path, meta):
    with fmt.atomic_h5_write(path, copy_existing=True) as f:
        fmt.write_physics(f, meta)
    return path


def test_old_bundles_have_none_and_new_ones_round_trip(bundle_path):
    path = bundle_path("n64_g1")
    assert pr.load_bundle(path).physics == {}  # written before physics metadata: still loads
    b = pr.load_bundle(_with_physics(path, {**INSTRUMENT, "object_pixel_size_m": None}))
    assert b.physics == {**INSTRUMENT, "object_pixel_size_m": None}


@pytest.mark.parametrize("meta, message", [({"photon_energy_keV": 10.0}, "unknown key 'photon_energy_keV'"),
                                            ({"detector_distance_m": -2.0}, "must be a finite number > 0")])
def test_bad_physics_is_refused_by_writer_and_reader(bundle_path, meta, message):
    path = bundle_path("n64_g1")
    with pytest.raises(pr.BundleParamsError, match=message):
        _with_physics(path, meta)
    with h5py.File(path, "r+") as f:  # written by hand, past the writer's check
        fmt.write_json(f.create_group("physics"), "metadata_json", meta)
    with pytest.raises(pr.BundleParamsError, match=message):
        pr.load_bundle(path)


def test_host_checks_warn_with_numbers_or_refuse(bundle_path, caplog):
    b = pr.load_bundle(_with_physics(bundle_path("n64_g1"), INSTRUMENT))
    pixel = object_pixel_size(10_000.0, 2.0, 75e-6, 64)
    assert pixel == pytest.approx(5.166e-8, rel=1e-3)  # λ z / (N d)
    same = pr.HostPhysics(photon_energy_eV=10_000.0, detector_distance_m=2.0, object_pixel_size_m=pixel,
                          probe_pixel_size_m=pixel, probe=b.probe)
    counts = np.full((3, 64, 64), 1e9 / 64**2)  # the photon budget the fixture was trained at
    assert b.check_host(same, counts=counts, strict=True) == []
    other = pr.HostPhysics(photon_energy_eV=8_000.0, object_pixel_size_m=1.3 * pixel,
                           probe=np.roll(b.probe, 20, axis=0))
    found = b.check_host(other, counts=counts * 50)
    assert len(found) == 4 and any("photon energy 8000 eV" in f and "-20.0%" in f for f in found)
    assert any("object pixel" in f and "+30.0%" in f for f in found)  # derived from the bundle's instrument
    assert any("50× the 1e+09 photons" in f for f in found) and any("probe matches" in f for f in found)
    assert sum("physics check" in r.getMessage() for r in caplog.records) == 4
    with pytest.raises(pr.PhysicsMismatchError, match="photon energy"):
        b.check_host(other, strict=True)
    with pytest.raises(pr.PhysicsMismatchError, match="counts per frame"):
        d = max(b.contents.parity.values(), key=lambda c: c["input.amplitude"].shape[0])["input.amplitude"][:, 0]
        b.reconstruct((d * b.intensity_scale) ** 2 * 50, np.zeros((d.shape[0], 2)) + 40, counts=True,
                      host=pr.HostPhysics(), strict=True)
