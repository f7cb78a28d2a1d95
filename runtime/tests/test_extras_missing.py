"""Without the optional extras, the Triton and Dask paths say which ``pip install`` to run (exit 2, no traceback)."""

from __future__ import annotations

import importlib.util
import socket

import pytest

import ptycho_runtime as pr
from ptycho_runtime import cli


def _absent(module: str) -> None:
    if importlib.util.find_spec(module.split(".")[0]) is not None:
        pytest.skip(f"{module} is installed here; this checks the message where it is not")


def test_triton_backend_without_tritonclient(bundle_path):
    _absent("tritonclient")
    with pytest.raises(ImportError, match=r"pip install 'ptycho-runtime\[triton\]'"):
        pr.load_bundle(bundle_path("n64_g1"), backend="triton", url="127.0.0.1:8001")


def test_serve_without_pytriton(bundle_path, capsys):
    _absent("pytriton")
    socks = [socket.socket() for _ in range(3)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [str(sock.getsockname()[1]) for sock in socks]
    for sock in socks:
        sock.close()
    assert cli.main(["serve", str(bundle_path("n64_g1")), "--host", "127.0.0.1", "--http-port", ports[0],
                     "--grpc-port", ports[1], "--metrics-port", ports[2]]) == 2
    err = capsys.readouterr().err
    assert "pip install 'ptycho-runtime[serve]'" in err and "libpython" in err and "Traceback" not in err


def test_infer_many_without_dask(bundle_path, tmp_path, capsys):
    _absent("distributed")
    path = bundle_path("n64_g1")
    assert cli.main(["infer-many", str(path), str(path.parent / "scan.npz"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'ptycho-runtime[dask]'" in err and "Traceback" not in err
