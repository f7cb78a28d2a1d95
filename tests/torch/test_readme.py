"""The README's Python example runs as written (a newcomer's first copy-paste must work)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_save_and_load_example_runs(tmp_path, monkeypatch):
    from ptycho_export import params

    [block] = [b for b in _python_blocks() if "save_torch_bundle(" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "out" / "wts.h5").is_file()
    model, bundle_params = namespace["model"], namespace["params"]
    assert type(model).__name__ == "DiffractionToObject" and bundle_params["N"] == 64
    assert params.cfg["intensity_scale"] == pytest.approx(namespace["results"]["intensity_scale"])  # CONFIG-001
