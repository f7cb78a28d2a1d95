"""The old flat module paths keep working for one release, each with a DeprecationWarning naming the new home.

Run in fresh interpreters: a module imported once is cached, and warns only on its first import.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

OLD_TO_NEW = {
    "alignment": "reconstruction.alignment", "backends": "inference.backends", "bundle": "inference.bundle",
    "cli_cluster": "cli.cluster", "geometry": "reconstruction.geometry", "grouping": "reconstruction.grouping",
    "infer_many": "distributed.infer_many", "inputs": "reconstruction.inputs", "npz": "files.npz",
    "parity": "inference.parity", "physics": "inference.compatibility", "remote": "inference.remote_errors",
    "serve": "distributed.serve", "stitching": "reconstruction.stitching", "streaming": "inference.streaming",
    "triton_client": "inference.triton_backend", "worker": "hosts.worker",
}


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True,
                          text=True, timeout=120)


def test_importing_the_package_and_the_new_paths_warns_about_nothing():
    new = "; ".join(f"import ptycho_runtime.{m}" for m in OLD_TO_NEW.values())
    proc = _run(f"import ptycho_runtime, ptycho_runtime.cli, ptycho_runtime.format; {new}")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("old", sorted(OLD_TO_NEW))
def test_an_old_path_is_the_new_module_after_one_warning(old):
    new = OLD_TO_NEW[old]
    code = (f"import warnings, importlib\n"
            f"with warnings.catch_warnings(record=True) as w:\n"
            f"    warnings.simplefilter('always')\n"
            f"    o = importlib.import_module('ptycho_runtime.{old}')\n"
            f"n = importlib.import_module('ptycho_runtime.{new}')\n"
            f"assert o is n, (o, n)\n"
            f"msgs = [str(x.message) for x in w if x.category is DeprecationWarning]\n"
            f"assert len(msgs) == 1 and 'ptycho_runtime.{new}' in msgs[0], msgs\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_split_modules_keep_every_old_name():
    code = """
import warnings
warnings.simplefilter("ignore")
import ptycho_runtime.bundle_format as old
import ptycho_runtime.format as fmt
from ptycho_runtime.format import atomic, writer
import ptycho_runtime.triton_model as tm
from ptycho_runtime.distributed import triton_repository
from ptycho_runtime.inference import triton_spec
for name in fmt.__all__:
    assert getattr(old, name) is getattr(fmt, name), name
assert old._write_model is writer._write_model and old._fsync_dir is atomic._fsync_dir
assert old._check_graph_metadata is fmt.check_graph_metadata
for name in ("config_pbtxt", "write_model_repository", "parse_instances", "DEFAULT_MAX_BATCH_SIZE"):
    assert getattr(tm, name) is getattr(triton_repository, name)
for name in ("model_spec", "TritonModelSpec", "INPUT_NAME", "file_sha256", "check_model_name"):
    assert getattr(tm, name) is getattr(triton_spec, name)
from ptycho_runtime import cli
from ptycho_runtime.files import write_png
assert cli.write_png is write_png
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_old_cli_helpers_warn_and_still_write(tmp_path):
    """``ptycho_runtime.cli.write_reconstruction(path, recon, positions, bundle, ...)`` keeps its old signature."""
    import h5py
    import numpy as np

    from ptycho_runtime import cli
    from ptycho_runtime.reconstruction.stitching import stitch_patches

    class FakeBundle:  # the attributes write_reconstruction records, as a Bundle has them
        path, backend, device, providers = str(tmp_path / "wts.h5"), "onnx", "cpu", ["CPUExecutionProvider"]
        params = {"N": 64, "gridsize": 1, "intensity_scale": 2.0}

    recon = stitch_patches(np.ones((2, 64, 64), np.complex64), np.array([[40.0, 40.0], [50.0, 40.0]]))
    with pytest.warns(DeprecationWarning, match="ptycho_runtime.files.write_reconstruction"):
        write = cli.__getattr__("write_reconstruction")
    write(tmp_path / "r.h5", recon, np.zeros((2, 2)), FakeBundle(), 10.0, 0.2, "scan.npz")
    with h5py.File(tmp_path / "r.h5") as f:
        assert f.attrs["format"] == "ptycho-runtime-reconstruction" and f.attrs["N"] == 64
