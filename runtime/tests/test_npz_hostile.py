"""NPZ files from strangers: every member's header is checked before numpy allocates or inflates anything.

A 3 MB file declaring 3 GiB of deflated zeros, or a 1 MB one declaring
3.6 TiB it does not hold, used to end in a bare MemoryError (or in the host's
memory). Every case here must end in a ValueError that names the key.
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ptycho_runtime.files import npz
from ptycho_runtime.files.npz import read_npz_arrays

N, n = 64, 16


def _header(shape: tuple, dtype: str, version: int = 1) -> bytes:
    """An .npy header (format 1.0, or 3.0: the UTF-8 form numpy writes for unusual field names)."""
    meta = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    if version == 1:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, meta)
        return buf.getvalue()
    text = repr(meta).encode() + b" "
    text += b" " * (-(len(text) + 13) % 64) + b"\n"
    return b"\x93NUMPY\x03\x00" + struct.pack("<I", len(text)) + text


def _write(path: Path, members: dict, compression: int = zipfile.ZIP_STORED) -> Path:
    """members: key → an array (saved as numpy does) or (header bytes, number of zero bytes after it)."""
    with zipfile.ZipFile(path, "w", compression=compression, allowZip64=True) as z:
        for key, value in members.items():
            with z.open(f"{key}.npy", "w", force_zip64=True) as m:
                if isinstance(value, np.ndarray):
                    np.lib.format.write_array(m, value, allow_pickle=True)
                    continue
                header, zeros = value
                m.write(header)
                chunk = bytes(1 << 20)
                while zeros > 0:
                    m.write(chunk[:zeros])
                    zeros -= len(chunk)
    return path


def _scan() -> dict:
    rng = np.random.default_rng(0)
    side = np.arange(n) % 4 * 6.0 + 40
    return {"diffraction": rng.poisson(5.0, (n, N, N)).astype(np.float32), "xcoords": side,
            "ycoords": np.repeat(np.arange(4) * 6.0 + 40, 4), "probeGuess": np.ones((N, N), np.complex64)}


def test_a_decompression_bomb_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    monkeypatch.setattr(npz, "available_memory", lambda: 64 * 2**20)
    bomb = _write(tmp_path / "bomb.npz", {**_scan(), "diffraction": (_header((100, 512, 512), "<f4"), 100 * 2**20)},
                  zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 2**20  # 100 MiB of zeros in under 1 MiB
    with pytest.raises(ValueError, match=r"reading it takes about 0\.8 GB of memory \(its arrays' 0\.10 GB and "
                                         r"28 bytes per diffraction value"):
        read_npz_arrays(bomb)


def test_a_negative_dimension_cannot_cancel_a_bomb(tmp_path, monkeypatch):
    """numpy's header parser accepts a negative shape; its negative byte count once offset the bomb's."""
    monkeypatch.setattr(npz, "available_memory", lambda: 64 * 2**20)
    path = _write(tmp_path / "negative.npz", {**_scan(), "diffraction": (_header((100, 512, 512), "<f4"), 100 * 2**20),
                                              "xcoords": (_header((-10**12,), "<f8"), 16)}, zipfile.ZIP_DEFLATED)
    with pytest.raises(ValueError, match=r"key 'xcoords' declares the shape \(-1000000000000,\), with a negative"):
        read_npz_arrays(path)


def test_an_encrypted_member_is_refused_before_zipfile_asks_for_a_password(tmp_path):
    path = _write(tmp_path / "encrypted.npz", _scan())
    raw = bytearray(path.read_bytes())
    entry = raw.find(b"PK\x01\x02")  # the central directory's first entry
    while raw[entry + 46:entry + 46 + len(b"xcoords.npy")] != b"xcoords.npy":
        entry = raw.find(b"PK\x01\x02", entry + 4)
    raw[entry + 8] |= 0x1  # general-purpose flag bit 0: encrypted
    path.write_bytes(raw)
    with pytest.raises(ValueError, match="key 'xcoords' is encrypted or compressed in a way numpy never writes"):
        read_npz_arrays(path, units="counts")


def test_a_member_that_declares_more_than_it_holds_is_refused(tmp_path):
    liar = _write(tmp_path / "liar.npz", {**_scan(), "diffraction": (_header((10**6, 1000, 1000), "<f4"), 2**16)})
    with pytest.raises(ValueError, match=r"key 'diffraction' declares float32 \(1000000, 1000, 1000\) "
                                         r"\(4000000000000 bytes\) but holds only 65536"):
        read_npz_arrays(liar)


def test_keys_outside_the_contract_are_listed_but_never_read(tmp_path):
    path = _write(tmp_path / "extra.npz", {**_scan(), "huge_extra": (_header((10**6, 10**6), "<f8"), 16)})
    assert read_npz_arrays(path, units="counts")["diffraction"].shape == (n, N, N)
    scan = _scan()
    del scan["probeGuess"]
    path = _write(tmp_path / "missing.npz", {**scan, "probe": np.ones((N, N), np.complex64)})
    with pytest.raises(ValueError, match="missing 'probeGuess'.*keys present: diffraction, probe, xcoords, ycoords"):
        read_npz_arrays(path, units="counts")


@pytest.mark.parametrize("member, match", [
    (np.array([{"a": 1}] * n, dtype=object), "cannot be read without pickle"),
    ((_header((n, N, N), "<f4", 3), n * N * N * 4), "npy format version 3.0"),
    ((b"not an npy header", 0), "corrupt or not a numpy array"),
])
def test_members_numpy_would_unpickle_or_misread_are_refused(tmp_path, member, match):
    path = _write(tmp_path / "bad.npz", {**_scan(), "xcoords": member})
    with pytest.raises(ValueError, match=rf"key 'xcoords' .*{match}|key 'xcoords' {match}"):
        read_npz_arrays(path, units="counts")


def test_a_truncated_member_is_a_value_error(tmp_path):
    path = _write(tmp_path / "scan.npz", _scan())
    raw = bytearray(path.read_bytes())
    at = raw.find(b"diffraction.npy", 40)  # the central directory's entry: its sizes stay, the data goes
    raw[200:at] = b"\0" * (at - 200)
    bad = tmp_path / "zeroed.npz"
    bad.write_bytes(raw)
    with pytest.raises(ValueError):
        read_npz_arrays(bad, units="counts")


def test_a_single_npy_or_a_non_zip_is_named(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match="a single .npy array, not an NPZ"):
        read_npz_arrays(tmp_path / "one.npy")
    (tmp_path / "notes.npz").write_text("hello")
    with pytest.raises(ValueError, match="is not an NPZ file"):
        read_npz_arrays(tmp_path / "notes.npz")
