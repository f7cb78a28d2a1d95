"""``ptycho-runtime``: the parser of every subcommand, and the one mapping from errors to exit codes.

    ptycho-runtime infer BUNDLE SCAN.npz -o RECON.h5 [--png RECON.png] [--backend …] [--device …]
    ptycho-runtime infer BUNDLE --product IN_product.h5 --patterns IN_diffraction.h5 -o OUT_product.h5
    ptycho-runtime info BUNDLE [--json]
    ptycho-runtime triton-repo | serve | infer-many ...   (cli.cluster: Triton and Dask)

Each subcommand lives in its own module (``infer``, ``info``, ``cluster``),
with its work in a function callable without argv. Never imports torch
unless ``--backend torchscript`` is asked for.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .. import format as fmt
from .._version import __version__
from ..inference.backends import DeviceUnavailableError
from ..inference.remote_errors import RemoteError
from .cluster import add_cluster_commands
from .common import EPILOG, EXIT_BAD_INPUT, EXIT_CHECKSUM, EXIT_REMOTE, EXIT_UNEXPECTED, UsageError
from .infer import add_infer_command
from .info import add_info_command


def build_parser() -> argparse.ArgumentParser:
    """The ``ptycho-runtime`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ptycho-runtime",
        description="Run ptycho-export bundles: reconstruct a scan, or inspect a bundle (no torch needed).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_infer_command(sub)
    add_info_command(sub)
    add_cluster_commands(sub)  # triton-repo, serve, infer-many
    return parser


def _error(message: str) -> None:
    message = " ".join(str(message).split())  # one line
    print(f"ptycho-runtime: error: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, run the subcommand, and turn what it raises into an exit code and one stderr line."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits 2 on bad usage
    debug = getattr(args, "debug", False)
    # runtime warnings (e.g. the CUDA → CPU fallback) reach stderr through logging's last-resort handler
    try:
        return int(args.func(args))
    except fmt.BundleIntegrityError as exc:  # checksum mismatch or failed self-test: damaged or modified
        if debug:
            raise
        _error(exc)
        return EXIT_CHECKSUM
    except RemoteError as exc:  # a Triton server or Dask cluster: the deployment, not the input
        if debug:
            raise
        _error(exc)
        return EXIT_REMOTE
    except (UsageError, fmt.BundleError, FileNotFoundError, IsADirectoryError, DeviceUnavailableError,
            ValueError, TypeError) as exc:
        if debug:
            raise
        _error(exc)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            raise
        _error(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
