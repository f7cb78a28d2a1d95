"""Bundles are parsed in a child process (``format.isolated``): a file that makes libhdf5 loop costs a time limit.

Torch-free: the bundles are small ones written with ``format.write_bundle``.
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import struct
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ptycho_runtime import format as fmt
from ptycho_runtime.format import isolated, wire
from ptycho_runtime.format.reader import read_bundle_in_process

TRAINING = {"epochs_run": 3, "device": "cpu"}


def _bundle(folder: Path, training: dict = TRAINING) -> Path:
    """A gridsize-1 bundle with one small model (what the reader checks, not a trained network)."""
    rng = np.random.default_rng(0)
    probe = np.exp(1j * rng.uniform(0, 1, (64, 64))).astype(np.complex64)
    params = {"N": 64, "gridsize": 1, "intensity_scale": 3.0, "n_filters_scale": 1, "output_mode": "amp_phase",
              "nphotons": 1e9, "probe": probe}
    arch = {"N": 64, "gridsize": 1, "n_filters_scale": 1, "output_mode": "amp_phase"}
    model = fmt.ModelRecord(arch, {"conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32)}, 36)
    return fmt.write_bundle(folder / "wts.h5", params, {"diffraction_to_obj": model}, "isolation test", {},
                            training=training)


def _heap_loop_copy(path: Path) -> Path:
    """A copy whose root ``format`` attribute is a variable-length string (as format 1 stores every string), its
    global-heap object's header then zeroed.

    libhdf5 reads the heap object as free space of size 0 and loops forever (found by fuzzing a format-1 bundle).
    """
    out = path.with_name("heap_loop.h5")
    out.write_bytes(path.read_bytes())
    with h5py.File(out, "r+") as f:
        del f.attrs["format"]
        f.attrs["format"] = fmt.FORMAT_NAME  # a Python str: h5py's variable-length string, in the global heap
    raw = bytearray(out.read_bytes())
    text = fmt.FORMAT_NAME.encode()
    at = raw.find(struct.pack("<Q", len(text)) + text)  # the heap object: index, references, reserved, size, text
    assert at >= 8
    raw[at - 8:at + 8] = bytes(16)
    out.write_bytes(raw)
    return out


def test_a_file_that_makes_libhdf5_loop_is_refused_and_the_next_read_works(tmp_path):
    path = _bundle(tmp_path)
    looping = _heap_loop_copy(path)
    t0 = time.perf_counter()
    with pytest.raises(fmt.BundleFormatError, match=r"took longer than 2 s.*damaged or crafted") as exc:
        fmt.read_bundle(looping, time_limit_s=2)
    assert 2 <= time.perf_counter() - t0 < 15
    assert exc.value.path == str(looping)
    with pytest.raises(fmt.BundleFormatError, match="took longer than 1 s"):
        fmt.check_bundle_file(looping, time_limit_s=1)  # the header alone already loops
    assert fmt.read_bundle(path).training == TRAINING  # a fresh parsing process


def test_the_environment_sets_the_base_limit(tmp_path, monkeypatch):
    looping = _heap_loop_copy(_bundle(tmp_path))
    monkeypatch.setenv(isolated.PARSE_SECONDS_ENV, "1.5")
    with pytest.raises(fmt.BundleFormatError, match=r"took longer than 2 s"):  # 1.5 s + the file's size, rounded
        fmt.read_bundle(looping)


def test_errors_cross_as_the_same_class_and_message(tmp_path):
    path = _bundle(tmp_path)
    with h5py.File(path, "r+") as f:
        probe = f["params/arrays/probe"]
        arr = probe[()]
        arr.view(np.uint8)[5] ^= 0x01
        probe[...] = arr  # not re-hashed
    with pytest.raises(fmt.BundleChecksumError) as there:
        fmt.read_bundle(path)
    with pytest.raises(fmt.BundleChecksumError) as here:
        read_bundle_in_process(path)
    assert type(there.value) is type(here.value)
    assert (str(there.value), there.value.path, there.value.dataset) == (
        str(here.value), here.value.path, here.value.dataset) == (str(here.value), str(path),
                                                                   "/params/arrays/probe")


def test_json_in_a_bundle_cannot_pose_as_an_array(tmp_path):
    forged = {**TRAINING, "a": ["A", 0], "b": ["B", 0], "d": ["D", [["x", 1]]], "nested": {"l": ["L", []]}}
    c = fmt.read_bundle(_bundle(tmp_path, forged))
    assert c.training == forged


def test_a_parser_that_died_between_reads_is_replaced(tmp_path):
    path = _bundle(tmp_path)
    fmt.read_bundle(path)
    dead = isolated._parser.proc
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    assert fmt.read_bundle(path).training == TRAINING
    assert isolated._parser.proc.pid != dead.pid


def _in_a_fork(check) -> bytes:
    """``check()`` in a forked child: b"1" (true), b"0" (false or raised) or b"timeout" (killed after 60 s)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = False
        try:
            ok = bool(check())
        finally:
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
    os.close(w)
    ready, _, _ = select.select([r], [], [], 60)
    answer = os.read(r, 1) if ready else b"timeout"
    os.close(r)
    if answer == b"timeout":
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return answer


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_starts_its_own_parser(tmp_path):
    path = _bundle(tmp_path)
    fmt.read_bundle(path)
    parent_parser = isolated._parser.proc.pid

    def in_child() -> bool:
        ok = fmt.read_bundle(path).training == TRAINING and isolated._parser.proc.pid != parent_parser
        fmt.close_parser()
        return ok

    assert _in_a_fork(in_child) == b"1"
    assert fmt.read_bundle(path).training == TRAINING and isolated._parser.proc.pid == parent_parser


def test_a_host_that_cannot_start_the_parser_gets_a_bundle_error(tmp_path, monkeypatch):
    path = _bundle(tmp_path)
    fmt.close_parser()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(fmt.BundleParserUnavailableError, match="could not start the process that parses bundles"):
        fmt.read_bundle(path)
    monkeypatch.undo()
    assert fmt.read_bundle(path).training == TRAINING
    fmt.close_parser()
    monkeypatch.setattr(sys, "frozen", True, raising=False)  # sys.executable would be the application itself
    with pytest.raises(fmt.BundleParserUnavailableError, match="frozen application"):
        fmt.read_bundle(path)
    monkeypatch.undo()
    assert fmt.read_bundle(path).training == TRAINING


def _frame(header: dict, payload: bytes = b"") -> io.BytesIO:
    text = json.dumps(header).encode()
    return io.BytesIO(struct.pack("<Q", len(text)) + text + payload)


@pytest.mark.parametrize("header, payload, error", [
    ({"arrays": [["|O", [1]]]}, b"", wire.WireError),                        # object dtype
    ({"arrays": [["<f4", [-1]]]}, b"", wire.WireError),                      # negative dimension
    ({"arrays": [["<f4", [1024, 1024]]]}, b"", wire.WireError),              # more than the cap
    ({"arrays": [["<f4", [4]]]}, b"\0" * 8, EOFError),                        # truncated bytes
    ({"no": "arrays"}, b"", wire.WireError),
])
def test_a_malformed_frame_is_refused_before_it_allocates(header, payload, error):
    with pytest.raises(error):
        wire.read_frame(_frame(header, payload), max_array_bytes=1024)


def test_an_oversized_header_is_refused_unread():
    src = io.BytesIO(struct.pack("<Q", wire.MAX_HEADER_BYTES + 1))
    with pytest.raises(wire.WireError, match="header"):
        wire.read_frame(src, max_array_bytes=0)


def test_contents_with_untagged_containers_are_refused(tmp_path):
    body, arrays = wire.encode_contents(read_bundle_in_process(_bundle(tmp_path)))
    assert wire.decode_contents(body, arrays, tmp_path).training == TRAINING
    with pytest.raises(wire.WireError):
        wire.decode_contents({**body, "training": {"epochs_run": 3}}, arrays, tmp_path)
    with pytest.raises(wire.WireError):
        wire.decode_contents({**body, "history": ["A", len(arrays)]}, arrays, tmp_path)
    twice = ["D", [["x", ["B", 0]], ["y", ["B", 0]]]]  # one array copied twice: a few bytes of JSON, n × the memory
    with pytest.raises(wire.WireError, match="already used"):
        wire.decode_contents({**body, "training": twice}, arrays, tmp_path)


def test_time_limits_that_are_not_a_positive_number(tmp_path, monkeypatch):
    path = _bundle(tmp_path)
    assert fmt.read_bundle(path, time_limit_s=float("inf")).training == TRAINING  # no limit, not an OverflowError
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="time_limit_s must be a number of seconds > 0"):
            fmt.read_bundle(path, time_limit_s=bad)
    for value in ("inf", "nan", "-3", "soon"):  # the environment's base: the default instead
        monkeypatch.setenv(isolated.PARSE_SECONDS_ENV, value)
        assert fmt.read_bundle(path).training == TRAINING


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_fork_while_a_read_is_waiting_does_not_hang_the_child(tmp_path):
    """The reader thread blocks in the pipe's read; a forked child must not wait for anything it holds."""
    import threading

    path = _bundle(tmp_path)
    looping = _heap_loop_copy(path)
    errors = []
    waiting = threading.Thread(target=lambda: errors.append(pytest.raises(fmt.BundleFormatError, fmt.read_bundle,
                                                                          looping, time_limit_s=4)))
    waiting.start()
    time.sleep(1.0)  # the request is out, the reader thread in read()
    answer = _in_a_fork(lambda: fmt.read_bundle(path).training == TRAINING)
    waiting.join()
    assert answer == b"1" and len(errors) == 1


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU-time limit is checked through /proc")
def test_the_parsing_process_ends_by_itself_when_its_caller_dies_mid_loop(tmp_path):
    """A caller killed while libhdf5 loops leaves no child spinning: its CPU-time limit (2 × the limit + 10 s)."""
    import subprocess

    looping = _heap_loop_copy(_bundle(tmp_path))
    code = ("import os, sys, threading, time\n"
            "from ptycho_runtime import format as fmt\nfrom ptycho_runtime.format import isolated\n"
            "threading.Thread(target=fmt.read_bundle, args=(sys.argv[1],), kwargs={'time_limit_s': 1},"
            " daemon=True).start()\n"
            "while isolated._parser is None: time.sleep(0.05)\n"
            "time.sleep(0.5)\nprint(isolated._parser.proc.pid, flush=True)\nos._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", code, str(looping)], capture_output=True, text=True, timeout=60)
    child = int(out.stdout.split()[0])
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            break  # gone
        if state == "Z":
            break  # ended, not yet reaped
        time.sleep(0.5)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail(f"the parsing process {child} still ran 40 s after its caller died")


def test_a_relative_path_is_read_from_the_callers_working_directory(tmp_path, monkeypatch):
    """The parsing process outlives a chdir of its caller (the README example runs in its own folder)."""
    _bundle(tmp_path)
    fmt.read_bundle(tmp_path / "wts.h5")  # the child exists, started from another directory
    monkeypatch.chdir(tmp_path)
    assert fmt.read_bundle("wts.h5").training == TRAINING
    with pytest.raises(fmt.BundleNotFoundError, match="No bundle at missing.h5"):
        fmt.read_bundle("missing.h5")
    Path("empty.h5").write_bytes(b"")
    with pytest.raises(fmt.BundleFormatError, match="^empty.h5 is not an HDF5 file"):
        fmt.read_bundle("empty.h5")
