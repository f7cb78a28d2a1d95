"""Exit codes and the one error type a command raises for a mistake the user can fix.

Kept apart from the parser and the commands so every command module (and a
test calling one without argv) shares one table of exit codes.
"""

from __future__ import annotations

import sys

PROG = "ptycho-export"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARITY, EXIT_CHECKSUM = 0, 1, 2, 3, 4


class CliError(Exception):
    """An error the user can fix; printed as one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def error_line(message: str) -> None:
    """The one-line error format of every failure (``ptycho-export: error: ...`` on stderr)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
