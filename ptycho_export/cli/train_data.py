"""Where ``ptycho-export train`` gets its scans: a user's NPZ, a ptychodus product, or a simulation.

``load_training_data`` turns the options into (scan, held-out scan or None,
a one-line description for the report), refusing contradictory options with a
``CliError`` that names them; ``split_for_training`` holds out the test region.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol

from .errors import CliError

DEFAULT_NPHOTONS = 1e9


class ScanOptions(Protocol):
    """The options this module reads (``train_command.TrainOptions`` has them all)."""

    data: Optional[Path]
    simulate: Optional[str]
    product: Optional[Path]
    patterns: Optional[Path]
    test_data: Optional[Path]
    units: str
    counts: bool
    position_centre: str
    N: Optional[int]
    nphotons: Optional[float]
    seed: int
    n_positions: Optional[int]
    object_size: Optional[int]
    step: Optional[int]
    train_fraction: float


def _read_scan(path: Path, options: ScanOptions, what: str):
    """A user's NPZ scan with the declared units and centre convention; CliError naming the option on failure."""
    from ..data import load_npz

    try:
        return load_npz(path, units="counts" if options.counts else options.units,
                        position_centre=options.position_centre)
    except ValueError as exc:
        raise CliError(f"cannot use {what} {path}: {exc}") from None


def _scan_description(path: Path, data) -> str:
    units = (f"{data.nphotons:.3g} photons/frame on average" if data.nphotons is not None
             else "normalised amplitudes")
    return f"NPZ `{path}` ({data.n} patterns, N={data.N}, {units})"


def _from_product(options: ScanOptions):
    from ..data.npz import load_ptychodus

    if options.counts or options.units != "auto":
        raise CliError("--counts and --units do not apply to --product: ptychodus patterns are counts")
    try:
        data = load_ptychodus(options.product, options.patterns)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(f"cannot use --product {options.product} --patterns {options.patterns}: {exc}") from None
    desc = (f"ptychodus `{options.product}` + `{options.patterns}` ({data.n} patterns, N={data.N}, "
            f"{data.nphotons:.3g} photons/frame on average)")
    test = _read_scan(options.test_data, options, "--test-data") if options.test_data is not None else None
    return data, test, desc


def _from_npz(options: ScanOptions):
    if options.n_positions is not None or options.object_size is not None or options.step is not None:
        raise CliError("--n-positions, --object-size and --step only apply to --simulate")
    data = _read_scan(options.data, options, "--data")
    if options.N is not None and options.N != data.N:
        raise CliError(f"--N {options.N} does not match the data: {options.data} holds {data.N}x{data.N} patterns")
    desc = _scan_description(options.data, data)
    test = None
    if options.test_data is not None:
        test = _read_scan(options.test_data, options, "--test-data")
        if test.N != data.N:
            raise CliError(f"--test-data holds {test.N}x{test.N} patterns but --data holds {data.N}x{data.N}")
        desc += f"; held out: {_scan_description(options.test_data, test)}"
    return data, test, desc


def _simulated(options: ScanOptions):
    from ..data import simulate_scan

    if options.counts or options.units != "auto" or options.test_data is not None:
        raise CliError("--counts, --units and --test-data only apply to --data")
    N = 64 if options.N is None else options.N
    kwargs: dict[str, Any] = dict(N=N, object_kind=options.simulate, nphotons=options.nphotons or DEFAULT_NPHOTONS,
                                  seed=options.seed, object_size=options.object_size)
    if options.n_positions is not None:
        if options.step is not None:
            raise CliError("--step sets a raster scan; --n-positions a random one: give one of them")
        kwargs.update(scan="random", n_positions=options.n_positions)
    elif options.step is not None:
        kwargs.update(step=options.step)
    try:
        data = simulate_scan(**kwargs)
    except ValueError as exc:
        raise CliError(f"cannot simulate the scan: {exc}") from None
    scan = f"{options.n_positions} random positions" if options.n_positions else f"a raster of {data.n} positions"
    desc = (f"simulated `{options.simulate}` object ({data.object.shape[0]}x{data.object.shape[1]} px), {scan}, "
            f"N={N}, nphotons {kwargs['nphotons']:g}, seed {options.seed}")
    return data, None, desc


def load_training_data(options: ScanOptions):
    """(scan, held-out scan or None, description) from exactly one of --data, --simulate, --product."""
    if (options.product is None) != (options.patterns is None):
        raise CliError("--product and --patterns go together: a ptychodus product file and its diffraction file")
    if options.product is not None:
        return _from_product(options)
    if options.data is not None:
        return _from_npz(options)
    return _simulated(options)


def split_for_training(data, test, train_fraction: float):
    """(train, test or None, how it was split): the bottom of the scan is held out unless a test scan was given.

    ``train_fraction`` 1 without a test scan trains on everything and leaves
    ``test`` None: there is then nothing to reconstruct or score.
    """
    if test is not None:
        return data, test, "all positions"
    if train_fraction == 1.0:
        return data, None, "all positions"
    try:
        train, held_out = data.split(fraction=train_fraction, mode="spatial")
    except ValueError as exc:
        raise CliError(f"--train-fraction {train_fraction}: {exc}") from None
    return train, held_out, f"spatial split {train_fraction:g}"
