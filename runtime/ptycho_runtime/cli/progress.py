"""Progress of a long command on stderr, with and without a terminal."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """Progress on a stream (stderr) that works with and without a terminal.

    On a TTY: one bar redrawn in place. Otherwise (a log file, CI, a pipe):
    one plain line each time another tenth of the work is done, with rate and
    ETA, so a long run is never silent.
    """

    def __init__(self, total: int, unit: str = "patterns", stream: Optional[TextIO] = None,
                 width: int = 30, min_interval_s: float = 0.1, lines: int = 10) -> None:
        self.total = max(int(total), 0)
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.min_interval_s = min_interval_s
        self.lines = max(int(lines), 1)
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_line = 0  # tenths reported so far (no terminal)
        isatty = getattr(self.stream, "isatty", None)
        try:
            self.tty = bool(isatty and isatty())
        except (ValueError, OSError):  # closed stream
            self.tty = False

    def update(self, n: int) -> None:
        """Count ``n`` more units done; draw the bar or print a line if due."""
        self.done += int(n)
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw >= self.min_interval_s or self.done >= self.total:
                self._last_draw = now
                self.stream.write("\r" + self._status(now, bar=True))
                self.stream.flush()
            return
        step = self.done * self.lines // self.total if self.total else self.lines
        if step > self._last_line:
            self._last_line = step
            self.stream.write(self._status(now, bar=False) + "\n")
            self.stream.flush()

    def _status(self, now: float, bar: bool) -> str:
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 and self.done < self.total else 0.0
        text = (f"{self.done}/{self.total} {self.unit} {100 * frac:3.0f}% {elapsed:6.1f} s, {rate:8.1f} {self.unit}/s, "
                f"ETA {eta:5.1f} s")
        if bar:
            filled = int(round(frac * self.width))
            return f"[{'#' * filled}{'.' * (self.width - filled)}] {text}"
        return text

    def close(self, final_line: Optional[str] = None) -> None:
        """End the bar (newline on a TTY) and print ``final_line`` (always, TTY or not)."""
        if self.tty:
            self.stream.write("\r\033[K" if final_line else "\n")
        if final_line:
            self.stream.write(final_line + "\n")
        self.stream.flush()
