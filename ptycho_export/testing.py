"""Small, real bundles for tests and examples (trained for a few steps on a simulated scan).

``python -m ptycho_export.testing OUT_DIR`` writes the fixture bundles the
runtime's own test-suite uses when torch is not installed (CI builds them
with torch, then runs the runtime tests in a torch-free environment).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from . import params
from .config import ModelConfig, TrainingConfig
from .data import save_npz, simulate_scan
from .workflows.components import run_cdi_example_torch

FIXTURES = {"n64_g1": dict(N=64, gridsize=1), "n64_g2": dict(N=64, gridsize=2)}


def make_test_bundle(out_dir: Path, N: int = 64, gridsize: int = 1, n_filters_scale: int = 1, nepochs: int = 1,
                     graphs: bool = True, seed: int = 0, n_positions: int = 48, output_mode: str = "amp_phase",
                     n_groups: Optional[int] = None, input_backprojection: bool = False) -> Path:
    """Train a tiny model for a few real optimiser steps and write ``out_dir/wts.h5`` (+ ``scan.npz``)."""
    params.reset_cfg()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scan = simulate_scan(N=N, object_size=3 * N, scan="random", n_positions=n_positions, seed=seed)
    save_npz(out_dir / "scan.npz", scan)
    config = TrainingConfig(model=ModelConfig(N=N, gridsize=gridsize, n_filters_scale=n_filters_scale,
                                              output_mode=output_mode,
                                              input_backprojection=input_backprojection),
                            nepochs=nepochs, batch_size=16, output_dir=out_dir, progress=False, seed=seed,
                            n_groups=n_groups, export_graphs=graphs)
    run_cdi_example_torch(scan, None, config)
    return out_dir / "wts.h5"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    for name, kwargs in FIXTURES.items():
        path = make_test_bundle(args.out_dir / name, **kwargs)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
