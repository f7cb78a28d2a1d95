"""Read and write the PtychoPINN NPZ data contract (numpy only) — the one definition.

Keys:

    diffraction  (n, N, N) float  counts, sqrt(counts) in photons, or a normalised amplitude
                                  (legacy name: diff3d; told apart by ``detect_units``)
    probeGuess   (N, N)    complex, at any absolute scale (``normalise_probe``); or a
                           (modes, N, N) stack, as ptychodus exports it (mode 0 is used)
    xcoords, ycoords (n,)  float, frame centres (pixel (N−1)/2) in object pixels
    objectGuess  (M, M')   complex   optional
    Y            (n, N, N) complex   optional (ground-truth object patches)
    scan_index   (n,)      int       optional

Other keys (``xcoords_start`` …) are ignored.  Files are opened with
``allow_pickle=False`` so a data file can never execute code, and every
problem is reported as a ValueError naming the key, the shape found and the
shape expected: users hand us files from other tools, and "KeyError: 'Y'"
tells them nothing.

The training side (``ptycho_export.data.load_npz`` / ``save_npz``) is a thin
layer over ``read_npz_arrays`` / ``write_npz_arrays``, so training and the
runtime accept exactly the same files.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from ..format import atomic_write_path
from ..format.isolated import available_memory
from ..reconstruction.geometry import DEFAULT_CENTRE, check_centre, to_default_centre
from ..reconstruction.inputs import check_scan_positions
from ..reconstruction.probe_scale import normalise_probe, scale_is_relative

log = logging.getLogger(__name__)  # under "ptycho_runtime": hosts configure that logger

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["UNITS", "detect_units", "normalise_probe", "normalization_factor", "read_npz_arrays", "write_npz_arrays"]


def normalization_factor(amplitudes: np.ndarray) -> float:
    """Factor f such that mean over patterns of Σ (f·X)² equals (N/2)².

    ``amplitudes`` is (..., N, N); every leading index is one pattern.
    """
    amps = np.asarray(amplitudes, dtype=np.float64)
    if amps.ndim < 2 or amps.shape[-1] != amps.shape[-2]:
        raise ValueError(f"amplitudes must end in a square (N, N); got shape {amps.shape}")
    N = amps.shape[-1]
    energy = float(np.mean(np.sum(amps.reshape(-1, N * N) ** 2, axis=-1)))
    if not np.isfinite(energy) or energy <= 0:
        raise ValueError(f"cannot normalise: mean pattern energy is {energy} (all-zero or non-finite data)")
    return float(np.sqrt((N / 2) ** 2 / energy))


# --------------------------------------------------------------------------- reading


CONTRACT_KEYS = ("diffraction", "diff3d", "probeGuess", "xcoords", "ycoords", "objectGuess", "Y", "scan_index")
NPY_MAGIC = b"\x93NUMPY"
# peak memory of read_npz_arrays: the stored arrays plus, per diffraction value, float64 copies (values, amplitude,
# a temporary) and the float32 result: 28 bytes (measured 5.2 × a float32 scan's bytes, i.e. 21 per value)
READ_PEAK_BYTES_PER_VALUE = 28
# what a zip member may be: numpy writes stored (np.savez) or deflated (np.savez_compressed) members
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_READ_ERRORS = (ValueError, OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error)


def _open_npz(path: PathLike) -> tuple[Dict[str, np.ndarray], list[str]]:
    """Load the contract's arrays of an NPZ, each checked before it is read; → (arrays, every key's name).

    Why not ``np.load``: an NPZ is a zip of ``.npy`` members from a stranger,
    and numpy allocates what a member's header declares before it reads a
    byte, then inflates whatever the zip holds. A 3 MB file can declare
    3 GiB of zeros (a decompression bomb), a 1 MB one 3.6 TiB it does not
    hold; both ended in a bare MemoryError. So each member's header is read
    first: it must hold the bytes its shape needs, no object dtype (no
    pickle), and the arrays together must fit in the memory this machine has
    available. Keys outside the contract are listed, never read. Every
    failure is a ValueError naming the key and the fix.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p} does not exist or is not a file")
    try:
        archive = zipfile.ZipFile(p)
    except _READ_ERRORS as exc:
        try:
            with open(p, "rb") as fh:
                single = fh.read(len(NPY_MAGIC)) == NPY_MAGIC
        except OSError:
            single = False
        if single:
            raise ValueError(f"{p} is a single .npy array, not an NPZ file with named keys") from None
        raise ValueError(f"{p} is not an NPZ file (numpy could not read it: {exc})") from None
    with archive:
        members = {info.filename[:-4]: info for info in archive.infolist() if info.filename.endswith(".npy")}
        wanted = {key: _npy_header(p, archive, members[key]) for key in CONTRACT_KEYS if key in members}
        stored = sum(nbytes for _, nbytes, _ in wanted.values())
        values = sum(count for key, (_, _, count) in wanted.items() if key in ("diffraction", "diff3d"))
        needed = stored + READ_PEAK_BYTES_PER_VALUE * values
        available = available_memory()
        if available is not None and needed > 0.75 * available:  # a quarter kept for the host
            raise ValueError(f"{p}: reading it takes about {needed / 1e9:.1f} GB of memory (its arrays' "
                             f"{stored / 1e9:.2f} GB and {READ_PEAK_BYTES_PER_VALUE} bytes per diffraction value "
                             f"for the unit conversion), more than ¾ of the {available / 1e9:.1f} GB this process "
                             "has available. Split the scan into several files, or read it on a machine with more "
                             "memory")
        out: Dict[str, np.ndarray] = {}
        for key, (info, _, _) in wanted.items():
            try:
                with archive.open(info) as member:
                    out[key] = np.lib.format.read_array(member, allow_pickle=False)
            except MemoryError:
                raise ValueError(f"{p}: key {key!r} does not fit in this process's memory; split the scan into "
                                 "several files") from None
            except _READ_ERRORS as exc:
                raise ValueError(f"{p}: key {key!r} is corrupt ({type(exc).__name__}: {str(exc)[:200]})") from None
    return out, sorted(members)


def _npy_header(p: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[zipfile.ZipInfo, int, int]:
    """A member's declared array, checked against the bytes the member holds; → (its entry, bytes, values)."""
    key = info.filename[:-4]
    if info.flag_bits & 0x1 or info.compress_type not in _ZIP_METHODS:
        raise ValueError(f"{p}: key {key!r} is encrypted or compressed in a way numpy never writes (zip method "
                         f"{info.compress_type}); save the file with np.savez or np.savez_compressed")
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"npy format version {version[0]}.{version[1]} (1.0 and 2.0 are read)")
            header_bytes = member.tell()
    except _READ_ERRORS as exc:
        raise ValueError(f"{p}: key {key!r} is corrupt or not a numpy array ({str(exc)[:200]})") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"{p}: key {key!r} declares the shape {shape}, with a negative dimension: the file is "
                         "crafted or damaged. Copy it again from its source")
    if dtype.hasobject:
        raise ValueError(f"{p}: key {key!r} cannot be read without pickle (object arrays are refused: it holds "
                         f"{dtype}); save plain numeric arrays")
    count = int(np.prod(shape, dtype=object))
    nbytes = count * dtype.itemsize
    if nbytes > info.file_size - header_bytes:
        raise ValueError(f"{p}: key {key!r} declares {dtype} {shape} ({nbytes} bytes) but holds only "
                         f"{info.file_size - header_bytes}: the file is truncated or crafted. Copy it again from "
                         "its source")
    return info, nbytes, count


def _describe_bad(values: np.ndarray) -> str:
    """Count NaN / inf / negative entries and list the first offending patterns."""
    nan = np.isnan(values)
    inf = np.isinf(values)
    neg = values < 0
    bad_pattern = np.flatnonzero((nan | inf | neg).reshape(values.shape[0], -1).any(axis=1))
    first = ", ".join(str(i) for i in bad_pattern[:10])
    more = " …" if bad_pattern.size > 10 else ""
    return (
        f"{int(nan.sum())} NaN, {int(inf.sum())} infinite and {int(neg.sum())} negative value(s) "
        f"in {bad_pattern.size} pattern(s); first pattern indices: [{first}{more}]"
    )


def _require(arrays: Mapping[str, np.ndarray], key: str, expected: str, keys: list[str]) -> np.ndarray:
    if key not in arrays:
        present = ", ".join(keys) or "none"
        raise ValueError(f"NPZ is missing {key!r} (expected {expected}); keys present: {present}")
    return arrays[key]


def _check_shape(key: str, arr: np.ndarray, expected: tuple, what: str) -> None:
    if arr.shape != expected:
        raise ValueError(f"NPZ key {key!r} has shape {arr.shape}; expected {what} = {expected}")


def _check_numeric(key: str, arr: np.ndarray, allow_complex: bool) -> None:
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"NPZ key {key!r} has non-numeric dtype {arr.dtype}")
    if not allow_complex and np.iscomplexobj(arr):
        raise ValueError(f"NPZ key {key!r} must be real; got complex dtype {arr.dtype}")


def _first_probe_mode(probe: np.ndarray, N: int, path: PathLike) -> np.ndarray:
    """The (N, N) probe: as stored, or mode 0 of a (modes, N, N) stack (ptychodus's PtychoPINN export).

    Every engine here models one coherent mode. A stack of one is squeezed
    silently; from a longer one mode 0 (ptychodus's dominant mode) is used and
    a warning names how many modes were dropped, since their intensity is then
    missing from the model.
    """
    _check_numeric("probeGuess", probe, allow_complex=True)
    if probe.ndim == 3 and probe.shape[1:] == (N, N) and probe.shape[0] >= 1:
        modes = probe.shape[0]
        if modes > 1:
            log.warning("%s: probeGuess holds %d probe modes; using mode 0 and dropping the other %d "
                        "(the runtime models one coherent mode)", path, modes, modes - 1)
        probe = probe[0]
    _check_shape("probeGuess", probe, (N, N), "(N, N) or (modes, N, N)")
    return probe


UNITS = ("auto", "photons", "counts", "normalised")


def detect_units(values: np.ndarray) -> str:
    """Tell counts, photon-unit amplitudes (sqrt of counts) and normalised amplitudes apart.

    Counts are whole numbers; sqrt(counts) in photon units squares back to
    whole numbers (to float32 rounding) without being whole itself; anything
    else is a normalised amplitude of arbitrary scale. Zero-only or 0/1-only
    data read the same either way and are called counts.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    sample = v if v.size <= 1 << 22 else v[:: v.size // (1 << 22) + 1]
    if np.all(sample == np.round(sample)):
        return "counts"
    # float32 keeps sqrt(k) to 6e-8 relative, so k comes back to ±1.2e-7·k: decidable for k up to ~1e5.
    sq = sample * sample
    testable = (sq < 1e5) & (sample != np.round(sample))
    if np.count_nonzero(testable) >= 16 and np.all(np.abs(sq - np.round(sq))[testable] <= 1e-4 + 4e-7 * sq[testable]):
        return "photons"
    return "normalised"


def read_npz_arrays(path: PathLike, counts: Optional[bool] = None, units: str = "auto",
                    position_centre: str = DEFAULT_CENTRE, _stacklevel: int = 2) -> Dict[str, Any]:
    """Read and validate a PtychoPINN NPZ; return its arrays under their NPZ key names.

    Returned keys: ``diffraction`` (float32 (n, N, N) normalised amplitude,
    also when the file uses the legacy name ``diff3d``), ``xcoords`` and
    ``ycoords`` (float64 (n,), frame centre at pixel (N−1)/2),
    ``probeGuess`` (complex64 (N, N), in the normalised diffraction's units;
    mode 0 of a (modes, N, N) stack) and, when present, ``objectGuess``, ``Y`` ((n, N, N)) and ``scan_index``
    ((n,)); plus ``units`` (what the diffraction held), ``nphotons`` (mean
    counts per pattern, None for normalised input) and ``probe_scale`` (how
    the probe's scale was chosen, ``normalise_probe``'s label; also logged on
    the ``ptycho_runtime`` logger: WARNING when the brightest-frame rule set
    it, so the object's amplitude is relative, INFO otherwise).

    Args:
        path: the .npz file.
        units: what ``diffraction`` holds. "auto" (default) tells it from the
            values (``detect_units``): "counts" (detector counts, square root
            taken), "photons" (sqrt(counts), the PtychoPINN and ptychodus
            export convention) or "normalised" (an amplitude of arbitrary
            scale, used as stored). Counts and photons are rescaled by
            ``normalization_factor`` so the mean Σ X² is (N/2)², and their
            mean count per pattern is returned as ``nphotons``.
        counts: the older spelling of ``units="counts"`` (True).
        position_centre: the frame pixel the file's positions name: "(N-1)/2"
            (PtychoPINN, ptychodus; default) or "N/2" (converted).

    Raises:
        ValueError: unreadable / non-NPZ file, missing or mis-shaped key,
            NaN / infinite / negative diffraction values, unknown units;
            and the unit guards: all-zero or constant patterns (with their
            indices), counts-like values under ``units="auto"`` that are not
            whole counts (declare the units), positions that all land on one
            spot (metres given as pixels), an outlier position or a scan too
            large for one canvas (``inputs.check_scan_positions``).
    """
    if counts:
        units = "counts"
    if units not in UNITS:
        raise ValueError(f"units must be one of {', '.join(UNITS)} (got {units!r})")
    check_centre(position_centre)
    arrays, keys = _open_npz(path)
    if "diffraction" in arrays:
        dkey = "diffraction"
    elif "diff3d" in arrays:
        dkey = "diff3d"
    else:
        present = ", ".join(keys) or "none"
        raise ValueError(
            "NPZ is missing 'diffraction' (or legacy 'diff3d') "
            f"(expected float array of shape (n, N, N)); keys present: {present}"
        )
    diff = arrays[dkey]
    _check_numeric(dkey, diff, allow_complex=False)
    if diff.ndim == 4 and diff.shape[-1] == 1:
        diff = diff[..., 0]
    if diff.ndim != 3 or diff.shape[1] != diff.shape[2]:
        hint = ""
        x = arrays.get("xcoords")
        if diff.ndim == 3 and diff.shape[0] == diff.shape[1] and x is not None and x.shape == (diff.shape[2],):
            hint = " (it looks like (N, N, n); transpose it to (n, N, N))"
        raise ValueError(
            f"NPZ key {dkey!r} has shape {diff.shape}; expected (n, N, N) with square patterns{hint}"
        )
    n, N = diff.shape[0], diff.shape[1]

    values = diff.astype(np.float64, copy=False)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(
            f"NPZ key {dkey!r} must hold finite, non-negative values: {_describe_bad(values)}. "
            "Check the detector mask / background subtraction (clip at 0) for those patterns."
        )
    flat = values.reshape(n, -1)
    constant = flat.min(axis=1) == flat.max(axis=1)
    if constant.all():
        raise ValueError(f"NPZ key {dkey!r}: every one of the {n} patterns is all zero or constant; the file holds "
                         "no diffraction (check the detector read-out, mask and background subtraction)")
    if constant.any():
        idx = np.flatnonzero(constant)
        shown = ", ".join(str(int(i)) for i in idx[:10]) + (" …" if idx.size > 10 else "")
        raise ValueError(f"NPZ key {dkey!r}: {idx.size} of {n} patterns are all zero or constant (indices [{shown}]): "
                         "dropped or saturated read-outs. Remove those patterns (and their xcoords/ycoords) from "
                         "the file")
    detected = units == "auto"
    if detected:
        units = detect_units(values)
    amp = np.sqrt(values) if units == "counts" else values
    factor = normalization_factor(amp)
    if units == "normalised":
        diffraction = diff.astype(np.float32, copy=False)
        factor = 1.0
        ratio = 1.0 / normalization_factor(amp) ** 2
        advice = (f"its mean Σ X² is {ratio:.3g}× the normalised value (N/2)² = {(N / 2) ** 2:g}; if it holds "
                  "counts or sqrt(counts) that were rescaled or background-subtracted, declare "
                  "units='counts' or units='photons' (CLI: --units counts / --units photons)")
        if detected and ratio > 100:  # counts-like: refuse unless told
            raise ValueError(f"{dkey!r} does not look like a normalised amplitude (its values are not whole photon "
                             f"counts, nor their square roots, yet {advice}; or declare units='normalised' "
                             "(--units normalised) to use the values as they are")
        if ratio > 100 or ratio < 0.01:
            warnings.warn(f"{dkey!r} is taken as a normalised amplitude but {advice}", stacklevel=_stacklevel)
        nphotons = None
    else:
        diffraction = (amp * factor).astype(np.float32)
        nphotons = float(np.mean(np.sum(amp.reshape(n, -1) ** 2, axis=-1)))

    out: Dict[str, Any] = {"diffraction": diffraction, "units": units, "nphotons": nphotons}
    for key in ("xcoords", "ycoords"):
        arr = _require(arrays, key, f"float array of shape (n,) = ({n},)", keys)
        _check_numeric(key, arr, allow_complex=False)
        _check_shape(key, arr.reshape(-1) if arr.ndim == 2 and 1 in arr.shape else arr, (n,), "(n,)")
        arr = arr.reshape(-1).astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"NPZ key {key!r} contains {int((~np.isfinite(arr)).sum())} NaN/inf value(s)")
        out[key] = to_default_centre(arr, N, position_centre)
    check_scan_positions(np.stack([out["xcoords"], out["ycoords"]], axis=1), N)

    probe = _first_probe_mode(_require(arrays, "probeGuess", f"complex array of shape (N, N) = ({N}, {N})", keys), N,
                         path)
    out["probeGuess"], out["probe_scale"] = normalise_probe(probe, amp, factor)
    if scale_is_relative(out["probe_scale"]):
        log.warning("%s: probeGuess %s", path, out["probe_scale"])
    else:
        log.info("%s: probeGuess scale kept: %s", path, out["probe_scale"])

    obj: Optional[np.ndarray] = arrays.get("objectGuess")
    if obj is not None:
        _check_numeric("objectGuess", obj, allow_complex=True)
        if obj.ndim != 2:
            raise ValueError(f"NPZ key 'objectGuess' has shape {obj.shape}; expected 2-D (M, M')")
        out["objectGuess"] = obj

    patches: Optional[np.ndarray] = arrays.get("Y")
    if patches is not None:
        _check_numeric("Y", patches, allow_complex=True)
        if patches.ndim == 4 and patches.shape[-1] == 1:
            patches = patches[..., 0]
        _check_shape("Y", patches, (n, N, N), "(n, N, N)")
        out["Y"] = patches

    scan_index: Optional[np.ndarray] = arrays.get("scan_index")
    if scan_index is not None:
        _check_numeric("scan_index", scan_index, allow_complex=False)
        _check_shape("scan_index", scan_index.reshape(-1) if scan_index.ndim else scan_index, (n,), "(n,)")
        out["scan_index"] = scan_index.reshape(-1)

    return out


# --------------------------------------------------------------------------- writing


def write_npz_arrays(path: PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as a compressed NPZ, atomically (``format.atomic_write_path``).

    A crash or a full disk never leaves a half-written file under the final
    name. The name is used exactly as given (numpy's automatic ".npz" suffix
    does not apply).
    """
    dest = Path(path)
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"cannot write {dest}: folder {folder} does not exist")
    with atomic_write_path(dest) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **dict(arrays))
