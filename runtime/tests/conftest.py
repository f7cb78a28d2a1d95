"""Fixture bundles for the runtime tests, with or without torch.

In a torch-free environment (CI's runtime job) the bundles come from
``$PTYCHO_TEST_BUNDLE_DIR`` (written by ``python -m ptycho_export.testing DIR``
in the training environment). With torch installed they are built here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

FIXTURE_NAMES = ("n64_g1", "n64_g2")


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    given = os.environ.get("PTYCHO_TEST_BUNDLE_DIR")
    if given:
        path = Path(given)
        missing = [n for n in FIXTURE_NAMES if not (path / n / "wts.h5").exists()]
        if missing:
            pytest.fail(f"PTYCHO_TEST_BUNDLE_DIR={given} lacks {missing}; run python -m ptycho_export.testing {given}")
        return path
    try:
        from ptycho_export.testing import FIXTURES, make_test_bundle
    except ImportError:
        pytest.skip("no PTYCHO_TEST_BUNDLE_DIR and ptycho_export (torch) not installed: cannot build fixture bundles")
    out = tmp_path_factory.mktemp("runtime_fixtures")
    for name, kwargs in FIXTURES.items():
        make_test_bundle(out / name, **kwargs)
    return out


@pytest.fixture
def bundle_path(fixture_dir, tmp_path):
    """bundle_path("n64_g1") → a private copy of that fixture's wts.h5 (its scan.npz beside it)."""

    def get(name: str = "n64_g1") -> Path:
        dst = tmp_path / name
        if not dst.exists():
            shutil.copytree(fixture_dir / name, dst)
        return dst / "wts.h5"

    return get


@pytest.fixture(scope="module")
def g1_bundle(fixture_dir):
    """The gridsize-1 fixture bundle, loaded once per module (read-only: do not write to it)."""
    import ptycho_runtime as pr

    return pr.load_bundle(fixture_dir / "n64_g1" / "wts.h5")


@pytest.fixture(scope="module")
def g1_scan(fixture_dir):
    """The gridsize-1 fixture's scan: (normalised diffraction [48, 64, 64], positions [48, 2] as (x, y))."""
    import numpy as np

    from ptycho_runtime.files.npz import read_npz_arrays

    s = read_npz_arrays(fixture_dir / "n64_g1" / "scan.npz")
    return s["diffraction"], np.stack([s["xcoords"], s["ycoords"]], axis=1)
