"""What every ``ptycho-runtime`` subcommand shares: exit codes, the usage error, the NPZ reading options."""

from __future__ import annotations

import argparse
from typing import Any

from ..files.npz import UNITS
from ..reconstruction.geometry import CENTRE_CONVENTIONS, DEFAULT_CENTRE

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_REMOTE = 3
EXIT_CHECKSUM = 4
EXIT_SCANS_FAILED = 5

EPILOG = """\
exit codes:
  0  success
  1  unexpected error (a bug: please report it with the --debug traceback)
  2  bad input: missing file, not a bundle, bad NPZ, wrong shapes, unusable option
     (e.g. --device cuda without a usable GPU, --backend torchscript without torch)
  3  remote failure: a Triton server or Dask scheduler is unreachable, went away or timed out
  4  checksum failure: the bundle is damaged or was modified (a checksum or the load-time self-test failed)
"""


class UsageError(Exception):
    """Bad input detected by the CLI itself (exit 2)."""


def add_scan_arguments(p: argparse.ArgumentParser) -> None:
    """--units, --counts and --position-centre: how to read a user's NPZ (both CLIs, one wording; docs/data.md)."""
    p.add_argument("--units", choices=UNITS, default="auto",
                   help="what the NPZ 'diffraction' holds: counts, photons (sqrt of counts, the PtychoPINN and "
                        "ptychodus convention), normalised (arbitrary-scale amplitude) or auto (told from the "
                        "values; default)")
    p.add_argument("--counts", action="store_true", help="same as --units counts")
    p.add_argument("--position-centre", choices=CENTRE_CONVENTIONS, default=DEFAULT_CENTRE,
                   help="frame pixel the NPZ positions name: (N-1)/2 (PtychoPINN, ptychodus; default) or N/2")


def load_bundle_or_usage(path: str, backend: str = "auto", device: str = "auto", precision: str = "fp32") -> Any:
    """``load_bundle``, with a missing optional package (torch, onnx for fp16) as a usage error."""
    from ..inference.bundle import load_bundle

    try:
        return load_bundle(path, backend=backend, device=device, precision=precision)
    except ImportError as exc:  # backend="torchscript" without torch, fp16 without onnx
        raise UsageError(str(exc)) from exc
