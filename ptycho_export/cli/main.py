"""``main``: parse argv, run the chosen command, and turn every failure into one line and an exit code."""

from __future__ import annotations

import shlex
import sys
import traceback
from typing import Optional, Sequence

from .errors import EXIT_CHECKSUM, EXIT_ERROR, EXIT_PARITY, EXIT_USAGE, CliError, error_line
from .parser import build_parser, with_default_command


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; return the exit code (see ``--help``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(with_default_command(argv))
        except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
            return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
        if getattr(args, "command", None) is None:
            parser.print_usage(sys.stderr)
            error_line("give a bundle path or a command (run with --help for the list)")
            return EXIT_USAGE
        args.command_line = "ptycho-export " + shlex.join(argv)  # recorded in what the command writes
        return int(args.func(args))
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line per failure, traceback only with --debug
        if debug:
            traceback.print_exc()
        code, message = classify(exc)
        error_line(message)
        return code


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, the one error line) of an exception a command raised."""
    from ptycho_runtime.format import BundleChecksumError, BundleError, BundleIntegrityError

    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, BundleChecksumError):
        return EXIT_CHECKSUM, f"checksum failure: {exc}"
    if isinstance(exc, BundleIntegrityError):  # damaged or modified, caught by a self-test rather than a checksum
        return EXIT_CHECKSUM, f"integrity failure: {exc}"
    if isinstance(exc, (BundleError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return EXIT_USAGE, str(exc)  # every reader failure is a BundleError: bad input, not a bug
    if "torch" in sys.modules:  # a ParityError can only come from torch code (export.py)
        try:
            from ..export import ParityError
        except Exception:  # noqa: BLE001 - torch broken: no ParityError can have been raised
            ParityError = None  # type: ignore[assignment,misc]
        if ParityError is not None and isinstance(exc, ParityError):
            return EXIT_PARITY, f"parity mismatch: {exc}"
    return EXIT_ERROR, f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)"
