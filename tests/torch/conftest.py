"""Fixtures for the torch tests."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one intra-op thread (far faster on a shared, busy CPU); restored after."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
