"""The runtime never imports torch: not at import, not to load, predict, reconstruct, stream or run the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import ptycho_runtime

PACKAGE_DIR = Path(ptycho_runtime.__file__).parent

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import ptycho_runtime
    import ptycho_runtime.cli
    import ptycho_runtime.files.npz
    from ptycho_runtime.reconstruction.grouping import group_neighbors
    assert "torch" not in sys.modules, "import ptycho_runtime imported torch"

    def check(path, scan_path, out):
        b = ptycho_runtime.load_bundle(path)
        par = b.contents.parity["b3"]
        got = b.predict(par["input.amplitude"])
        ref = par["diffraction_to_obj.amplitude"] * np.exp(1j * par["diffraction_to_obj.phase"])
        assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
        scan = ptycho_runtime.files.npz.read_npz_arrays(scan_path)
        pos = np.stack([scan["xcoords"], scan["ycoords"]], axis=1)
        rec = b.reconstruct(scan["diffraction"], pos)
        idx = group_neighbors(pos[:, 0], pos[:, 1], b.gridsize)  # the stream takes pre-grouped frames
        with b.stream(scan_positions=pos, batch_size=16) as s:
            s.feed(scan["diffraction"][idx], pos[idx])
        assert np.abs(s.snapshot().object - rec.object).max() < 1e-6
        assert ptycho_runtime.cli.main(["info", path]) == 0
        assert ptycho_runtime.cli.main(["infer", path, scan_path, "-o", out]) == 0

    for path, scan_path, out in zip(*[iter(sys.argv[1:])] * 3):
        check(path, scan_path, out)
    assert "torch" not in sys.modules, "the runtime imported torch: " + repr(sys.modules["torch"])
    print("NO-TORCH-OK")
""")


def test_runtime_runs_without_importing_torch(bundle_path, tmp_path):
    args = []
    for name in ("n64_g1", "n64_g2"):
        path = bundle_path(name)
        args += [str(path), str(path.parent / "scan.npz"), str(tmp_path / f"{name}.h5")]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NO-TORCH-OK" in proc.stdout
    assert (tmp_path / "n64_g1.h5").exists() and (tmp_path / "n64_g2.h5").exists()


def test_runtime_works_when_torch_cannot_be_imported(bundle_path, tmp_path):
    """Even with torch installed, block it: every default path must still work."""
    path = bundle_path("n64_g1")
    blocked = "import sys; sys.modules['torch'] = None\n" + "\n".join(
        line for line in SCRIPT.splitlines() if "not in sys.modules" not in line)
    proc = subprocess.run([sys.executable, "-c", blocked, str(path), str(path.parent / "scan.npz"),
                           str(tmp_path / "r.h5")], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NO-TORCH-OK" in proc.stdout


def test_no_module_level_torch_import():
    """Static check: torch may appear only inside functions (the lazy TorchScript backend)."""
    for module in sorted(PACKAGE_DIR.glob("*.py")):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        for node in tree.body:
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "torch" or n.startswith("torch.") for n in names), f"{module.name} imports torch"
