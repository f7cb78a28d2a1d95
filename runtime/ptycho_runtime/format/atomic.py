"""Atomic writes: a file at its final path is either the old one or the complete new one.

The one atomic-write helper of the project, used for bundles, reconstruction
files, PNGs, NPZs and Triton repositories alike (``atomic_write_path`` for any
file, ``atomic_h5_write`` for an HDF5 file). It sits in the lowest layer
because the bundle writer needs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Iterator, Optional

import h5py

_TMP_SUFFIX = ".tmp"


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}."


def _remove_stale_temps(target: Path) -> list[Path]:
    """Remove temporary files of crashed writers of ``target`` on this host (their pid is gone).

    Temp names are ``.<name>.<host>.<pid>.<random>.tmp``: a file is removed only
    when it was made on this host by a process that no longer exists, so a
    concurrent writer (same or other host, e.g. on a network folder) is never
    disturbed. Returns what was removed.
    """
    host = _host_token()
    prefix = _tmp_prefix(target)
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(_TMP_SUFFIX)):
            continue
        parts = name[len(prefix):-len(_TMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if _pid_alive(int(parts[1])):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def _host_token() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or unknown: keep the file
    return True


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: fsync the folder that holds the entry (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike, copy_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block finishes.

    The one atomic-write helper of the project: the temporary file is in the
    same folder (so ``os.replace`` is atomic), gets the mode a plain ``open``
    would give (an existing file keeps its mode), is fsynced before the rename,
    and the folder is fsynced after it. On any exception the temporary file is
    removed and ``path`` is untouched. Temporary files of writers that were
    killed (no cleanup possible) are named after host and pid, and removed by
    the next write to the same path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = target.parent / f"{_tmp_prefix(target)}{_host_token()}.{os.getpid()}.{os.urandom(6).hex()}{_TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        try:
            mode = target.stat().st_mode & 0o777
        except FileNotFoundError:
            mask = os.umask(0)
            os.umask(mask)
            mode = 0o666 & ~mask
        os.chmod(tmp, mode)
        if copy_existing:
            shutil.copyfile(target, tmp)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_h5_write(path: str | os.PathLike, copy_existing: bool = False,
                    libver: Optional[tuple[str, str]] = None) -> Iterator[h5py.File]:
    """Yield an open HDF5 file that replaces ``path`` only if the block finishes (see ``atomic_write_path``).

    Any HDF5 file: bundles, and the reconstruction files of ``files.reconstruction_file``.
    With ``copy_existing`` the file starts as a copy of ``path`` (for in-place
    updates such as adding graphs). ``libver``: h5py's format bounds (bundles:
    ``schema.BUNDLE_LIBVER``); None keeps h5py's default.
    """
    with atomic_write_path(path, copy_existing) as tmp:
        f = h5py.File(tmp, "r+" if copy_existing else "w", libver=libver)
        try:
            yield f
        finally:
            f.close()
