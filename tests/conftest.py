"""Shared fixtures: real tiny bundles, built once per session and cached by their settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _clean_params():
    """Each test starts from PtychoPINN's default params.cfg (tests clobber it on purpose)."""
    try:
        from ptycho_export import params
    except ImportError:  # torch-free environment
        yield
        return
    params.reset_cfg()
    yield
    params.reset_cfg()


@pytest.fixture(scope="session")
def bundle_cache(tmp_path_factory):
    return {}


@pytest.fixture
def make_bundle(bundle_cache, tmp_path_factory, tmp_path):
    """make_bundle(N=64, gridsize=1, graphs=True, ...) → path of a private copy of a cached real bundle."""
    pytest.importorskip("torch")
    from ptycho_export.testing import make_test_bundle

    def factory(**kwargs) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in bundle_cache:
            out = tmp_path_factory.mktemp("bundle")
            bundle_cache[key] = make_test_bundle(out, **kwargs)
        src = bundle_cache[key]
        dst_dir = tmp_path / f"bundle_{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src.parent, dst_dir)
        return dst_dir / src.name

    return factory
