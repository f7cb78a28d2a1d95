"""The checksums of the format: what bytes a dataset's ``sha256`` covers, and a file's own hash."""

from __future__ import annotations

import hashlib
import os

import numpy as np


def payload_bytes(value: np.ndarray | bytes | str) -> bytes:
    """The exact bytes a checksum covers: UTF-8 for text, C-order raw bytes for arrays."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return np.asarray(value).tobytes(order="C")


def sha256_hex(value: np.ndarray | bytes | str) -> str:
    """The hex sha256 of ``payload_bytes(value)``: what every dataset's ``sha256`` attribute holds."""
    return hashlib.sha256(payload_bytes(value)).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks): a bundle's identity across machines."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
