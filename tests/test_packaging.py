"""Installs that do not fight: one ONNX Runtime distribution per extra, versions written once, a compatible range.

Read from the pyproject files themselves (no network, no install), so a change that would make
``pip install '.[gpu]'`` pull onnxruntime and onnxruntime-gpu together fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
ORT = re.compile(r"^onnxruntime(-gpu)?\b")


def _project(path: Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def _ort(requirements: list[str]) -> list[str]:
    return [r for r in requirements if ORT.match(r)]


def test_runtime_depends_on_no_onnxruntime_and_each_extra_brings_exactly_one():
    rt = _project(ROOT / "runtime" / "pyproject.toml")
    assert _ort(rt["dependencies"]) == []
    extras = rt["optional-dependencies"]
    assert [r.split(">")[0] for r in _ort(extras["cpu"])] == ["onnxruntime"]
    assert [r.split(">")[0] for r in _ort(extras["gpu"])] == ["onnxruntime-gpu"]
    for name, reqs in extras.items():
        assert len(_ort(reqs)) <= 1, f"extra [{name}] installs two ONNX Runtime distributions"


def test_root_package_passes_the_choice_on_and_pins_no_exact_runtime():
    root = _project(ROOT / "pyproject.toml")
    assert _ort(root["dependencies"]) == []
    runtime_reqs = [r for r in root["dependencies"] if r.startswith("ptycho-runtime")]
    assert len(runtime_reqs) == 1 and "==" not in runtime_reqs[0] and "<" in runtime_reqs[0], runtime_reqs
    extras = root["optional-dependencies"]
    assert extras["cpu"][0].startswith("ptycho-runtime[cpu]") and extras["gpu"][0].startswith("ptycho-runtime[gpu]")
    assert not any(_ort(reqs) for reqs in extras.values())
    assert any(r.startswith("ruff") for r in extras["test"])  # CI lints with what it installs


def test_versions_are_written_once_and_read_from_metadata():
    import ptycho_export
    import ptycho_runtime

    for package, pyproject in ((ptycho_export, ROOT / "pyproject.toml"),
                               (ptycho_runtime, ROOT / "runtime" / "pyproject.toml")):
        version = _project(pyproject)["version"]
        assert package.__version__ == version
        here = Path(package.__file__).parent  # the runtime reads it in _version.py (any layer may import it)
        init = (here / "_version.py" if (here / "_version.py").is_file() else here / "__init__.py").read_text()
        assert version not in init and "importlib" in init and "metadata" in init


def test_install_scripts_pick_the_cpu_extra_and_ci_runs_ruff():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    test = (ROOT / "scripts" / "test.sh").read_text()
    assert "./runtime[cpu,fast]" in setup and ".[cpu,test]" in setup  # the CPU onnxruntime, numba's loops
    assert "./runtime[cpu]" in test and "ruff check" in test
    assert "onnxruntime-gpu" not in setup + test
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e './runtime[gpu]' -e '.[gpu,test]'" in readme and "uninstall" not in readme


def test_gitignore_ignores_build_folders_anywhere():
    lines = (ROOT / ".gitignore").read_text().split()
    assert "build/" in lines and "/build/" not in lines
