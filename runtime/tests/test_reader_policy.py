"""The reader policy without torch: hostile bundles (tests/hostile/hostile_bundles.py) and writer hygiene.

Runs in the torch-free CI venv on the fixture bundles; the full matrix (every
reader, capped subprocesses, CLIs) is tests/hostile/test_hostile.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ptycho_runtime as pr
from ptycho_runtime import format as fmt
from ptycho_runtime.format import atomic

GENERATOR = Path(__file__).resolve().parents[2] / "tests" / "hostile" / "hostile_bundles.py"


def _generator():
    if not GENERATOR.exists():
        pytest.skip(f"{GENERATOR} not found (runtime tests run outside the repository)")
    spec = importlib.util.spec_from_file_location("hostile_bundles", GENERATOR)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hostile_bundles"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def hostile(fixture_dir, tmp_path_factory):
    gen = _generator()
    root = tmp_path_factory.mktemp("hostile_rt")
    cases = gen.make_cases(fixture_dir / "n64_g1" / "wts.h5", root / "cases", root / "canaries")
    yield gen, cases
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def test_runtime_readers_refuse_every_hostile_case(hostile, monkeypatch):
    """In the torch-free venv; with torch, tests/hostile runs the same cases through every reader (capped)."""
    if importlib.util.find_spec("torch") is not None and (GENERATOR.parent / "test_hostile.py").exists():
        pytest.skip("torch environment: tests/hostile/test_hostile.py covers these readers and more")
    gen, cases = hostile
    problems = []
    canaries = [p for c in cases for p in c.canaries]
    gen.reset_canaries(canaries)
    for c in cases:
        if c.cwd:
            monkeypatch.chdir(c.cwd)
        for reader, call in ((gen.READ, fmt.read_bundle), (gen.LOAD, pr.load_bundle)):
            try:
                call(c.path)
                outcome = None
            except fmt.BundleError as exc:
                outcome = exc
                if re.search(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{12,}\b", str(exc)):
                    problems.append(f"{reader}/{c.name}: message shows a hash")
                if "\n" in str(exc):
                    problems.append(f"{reader}/{c.name}: message is not one line")
            except Exception as exc:  # noqa: BLE001 - what the test is looking for
                problems.append(f"{reader}/{c.name}: {type(exc).__name__}: {exc}")
                continue
            if reader in c.must_reject and outcome is None:
                problems.append(f"{reader}/{c.name}: accepted")
    assert not gen.canaries_read(canaries), "a reader read a file outside the bundle"
    assert not problems, "\n".join(problems)


def test_error_classes(hostile):
    gen, cases = hostile
    by_name = {c.name: c.path for c in cases}
    expect = {"external_link_params": fmt.BundleUnsafeError, "external_storage_probe": fmt.BundleUnsafeError,
              "virtual_dataset": fmt.BundleUnsafeError, "bundle_is_fifo": fmt.BundleUnsafeError,
              "shape_bomb_history": fmt.BundleLimitError, "gzip_bomb_graph": fmt.BundleUnsafeError,
              "params_scale_nan": fmt.BundleParamsError, "shadow_N": fmt.BundleParamsError,
              "bitflip_unhashed": fmt.BundleChecksumError}
    for name, cls in expect.items():
        with pytest.raises(cls) as info:
            fmt.read_bundle(by_name[name])
        assert isinstance(info.value, fmt.BundleFormatError) and isinstance(info.value, ValueError)
        assert info.value.dataset is not None or name == "bundle_is_fifo"
    with pytest.raises(fmt.BundleIntegrityError, match="self-test failed"):
        pr.load_bundle(by_name["rehash_scale_x2_everywhere"])
    pr.load_bundle(by_name["rehash_scale_x2_everywhere"], self_test=False)  # opt-out exists, and only that differs
    with pytest.raises(fmt.BundleNotFoundError):
        fmt.read_bundle(by_name["shadow_N"].parent / "missing.h5")
    with pytest.raises(FileNotFoundError):  # still a FileNotFoundError for older callers
        fmt.read_bundle(by_name["shadow_N"].parent / "missing.h5")


def test_checksum_message_does_not_leak_the_hash(hostile):
    gen, cases = hostile
    path = {c.name: c.path for c in cases}["bitflip_unhashed"]
    import h5py

    with h5py.File(path, "r") as f:
        ds = f["graphs/onnx/diffraction_to_obj/bytes"]
        actual = fmt.sha256_hex(ds[()])
        stored = ds.attrs["sha256"]
    with pytest.raises(fmt.BundleChecksumError) as info:
        fmt.read_bundle(path)
    assert actual[:8] not in str(info.value) and str(stored)[:8] not in str(info.value)


def test_self_test_passes_on_real_bundles(bundle_path):
    for name in ("n64_g1", "n64_g2"):
        errors = pr.load_bundle(bundle_path(name)).self_test()
        assert sorted(errors) == ["b1", "b3"] and max(errors.values()) < 1e-4


# --------------------------------------------------------------------------- writer hygiene


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "wts.h5"
    host = atomic._host_token()
    stale = tmp_path / f".wts.h5.{host}.{_dead_pid()}.abc123.tmp"
    live = tmp_path / f".wts.h5.{host}.{os.getppid()}.def456.tmp"  # a running process: maybe mid-write
    other_host = tmp_path / f".wts.h5.elsewhere.{_dead_pid()}.aaa.tmp"  # cannot tell: kept
    unrelated = tmp_path / ".other.h5.x.1.tmp"
    for p in (stale, live, other_host, unrelated):
        p.write_bytes(b"partial")
    with fmt.atomic_h5_write(target) as f:
        f.attrs["x"] = 1
    assert target.exists() and not stale.exists()
    assert live.exists() and other_host.exists() and unrelated.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".wts.h5.")) == sorted(
        [live.name, other_host.name])


def test_failed_write_leaves_no_temp_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "wts.h5"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with fmt.atomic_write_path(target) as tmp:
            tmp.write_bytes(b"new, half written")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["wts.h5"]


def test_atomic_write_fsyncs_the_folder(tmp_path, monkeypatch):
    synced = []
    real = atomic._fsync_dir
    monkeypatch.setattr(atomic, "_fsync_dir", lambda folder: (synced.append(Path(folder)), real(folder)))
    with fmt.atomic_write_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"data")
    assert synced == [tmp_path] and (tmp_path / "out.bin").read_bytes() == b"data"


def test_writer_refuses_params_the_reader_would_refuse():
    ok = {"N": 64, "gridsize": 1, "intensity_scale": 10.0, "output_mode": "amp_phase"}
    probe = np.ones((64, 64), np.complex64)
    fmt.check_writable_params(ok, {"probe": probe})
    for bad_scalars, bad_arrays in (({**ok, "n_filters_scale": 16}, {"probe": probe}),
                                    ({**ok, "intensity_scale": float("nan")}, {"probe": probe}),
                                    (ok, {"probe": probe, "big": np.zeros((64, 64, 3), np.complex128)}),
                                    (ok, {"probe": probe, "N": np.array(1)})):
        with pytest.raises(fmt.BundleParamsError):
            fmt.check_writable_params(bad_scalars, bad_arrays)
