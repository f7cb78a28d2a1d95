"""Random damage to a real bundle's HDF5 metadata ends in a load or a ``BundleError``, in bounded time.

The edits (byte flips, zeroed runs, random runs; a fixed seed) land only in
the file's metadata (everything outside the datasets' raw bytes), where
the payload checksums cannot see them and libhdf5 parses what it finds.
Format 1 (the shipped model) is where fuzzing found libhdf5 looping; the
parsing process's time limit turns that into a ``BundleFormatError``.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import h5py

from ptycho_runtime import format as fmt
from ptycho_runtime.format import isolated

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "realistic-zoneplate-n64-g2.h5"
MUTANTS = 40
PARSE_LIMIT_S = 1.0


def _metadata_ranges(path: Path) -> list[tuple[int, int]]:
    """[start, end) byte ranges of the file outside every dataset's contiguous raw data."""
    raw: list[tuple[int, int]] = []

    def visit(_name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset) and obj.id.get_offset() is not None:
            raw.append((obj.id.get_offset(), obj.id.get_offset() + obj.id.get_storage_size()))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    out, pos = [], 0
    for start, end in sorted(raw):
        if start > pos:
            out.append((pos, start))
        pos = max(pos, end)
    out.append((pos, path.stat().st_size))
    return out


def _mutants(path: Path, seed: int, folder: Path):
    data = path.read_bytes()
    ranges = _metadata_ranges(path)
    total = sum(end - start for start, end in ranges)
    rng = random.Random(seed)

    def offset() -> int:
        k = rng.randrange(total)
        for start, end in ranges:
            if k < end - start:
                return start + k
            k -= end - start
        raise AssertionError

    for i in range(MUTANTS):
        b = bytearray(data)
        at, kind = offset(), rng.choice(("flip", "zero", "random"))
        if kind == "flip":
            for _ in range(rng.randint(1, 4)):
                b[offset()] = rng.randrange(256)
        else:
            n = len(b[at:at + rng.randint(1, 64)])
            b[at:at + n] = bytes(n) if kind == "zero" else bytes(rng.randrange(256) for _ in range(n))
        out = folder / f"mutant{i}.h5"
        out.write_bytes(b)
        yield out


def _sources(bundle_path) -> list[tuple[str, Path]]:
    sources = [("format 2", bundle_path("n64_g2"))]
    if SHIPPED.is_file():
        sources.append(("format 1", SHIPPED))
    return sources


def test_damaged_metadata_ends_in_a_load_or_a_bundle_error(bundle_path, tmp_path, monkeypatch):
    monkeypatch.setenv(isolated.PARSE_SECONDS_ENV, str(PARSE_LIMIT_S))
    outcomes: dict[str, dict[str, int]] = {}
    for label, source in _sources(bundle_path):
        folder = tmp_path / label.replace(" ", "")
        folder.mkdir()
        tally = outcomes.setdefault(label, {})
        for mutant in _mutants(source, seed=11, folder=folder):
            t0 = time.perf_counter()
            try:
                fmt.read_bundle(mutant)
                outcome = "loaded"
            except fmt.BundleError as exc:  # anything else fails the test
                outcome = "timeout" if "took longer than" in str(exc) else type(exc).__name__
                assert str(mutant) in str(exc), str(exc)
            elapsed = time.perf_counter() - t0
            assert elapsed < PARSE_LIMIT_S + 10, f"{label} {mutant.name}: {outcome} after {elapsed:.1f} s"
            tally[outcome] = tally.get(outcome, 0) + 1
            mutant.unlink()
    print(outcomes)  # pytest -s: the outcome counts per format
    refused = sum(n for label in outcomes for outcome, n in outcomes[label].items() if outcome != "loaded")
    assert refused >= MUTANTS // 2, outcomes  # the edits reach the structure, not only slack
