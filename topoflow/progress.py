"""Progress for terminals and batch logs: the one `progress_bar()` behind every long loop's display.

On a terminal (stderr is a tty) it is a tqdm bar, and while it is open the records of the caller's
logger are written above it (tqdm's `logging_redirect_tqdm`) instead of being glued onto it. In a
batch job (stderr is a file) a bar is a flood of carriage returns, so the same tqdm still counts,
times and rate-limits, but each display is one plain log record, at most every `interval` seconds,
plus the first and the last:

    2024-05-01 10:00:00,123 INFO fit: step 120/1000 (12%), 3.4 step/s, ETA 4m19s, val_loss=0.1532

Disabled (`--no-progress`) it shows nothing. Every mode returns a tqdm, so callers use tqdm's
interface: `with`, `update(n)`, `set_postfix(**fields)`, `close()`, `total`, `initial`, `desc`, `unit`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"  # every CLI's console and file lines: timestamped for batch logs
INTERVAL_S = 30.0


def progress_bar(total: float | None, *, desc: str, log: logging.Logger, unit: str = "it", initial: float = 0,
                 enabled: bool = True, interval: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 isatty: Callable[[], bool] | None = None) -> tqdm:
    """A progress display of `total` units (None: unknown) starting at `initial` (resumed work).

    `log` is the caller's logger: batch-log lines are its INFO records, and on a terminal its console
    handlers write above the bar. `clock` and `isatty` (default: sys.stderr's) are for tests.
    """
    common: dict[str, Any] = {"total": total, "initial": initial, "desc": desc, "unit": unit}
    if not enabled:
        return tqdm(disable=True, **common)
    if (isatty or sys.stderr.isatty)():
        return TerminalBar(loggers=console_loggers(log), dynamic_ncols=True, **common)
    return LogLines(log=log, interval=interval, clock=clock, **common)


def console_loggers(log: logging.Logger) -> list[logging.Logger]:
    """`log` and the ancestors its records reach that print to the console: the ones a bar must redirect
    (redirecting a logger without a console handler would add one and print its records twice)."""
    found: list[logging.Logger] = []
    current: logging.Logger | None = log
    while current is not None:
        if any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr) for h in current.handlers):
            found.append(current)
        current = current.parent if current.propagate else None
    return found


class TerminalBar(tqdm):
    """A tqdm bar; `loggers` write above it (tqdm.write) from creation until close."""

    def __init__(self, *, loggers: list[logging.Logger], **kwargs: Any) -> None:
        self._redirect = contextlib.ExitStack()
        self._redirect.enter_context(logging_redirect_tqdm(loggers, tqdm_class=tqdm))
        super().__init__(**kwargs)

    def close(self) -> None:
        super().close()
        self._redirect.close()


class LogLines(tqdm):
    """tqdm whose display is a plain INFO record instead of a redrawn bar.

    tqdm keeps the counting, `initial`, postfix formatting and rate limiting (mininterval = interval,
    checked on every update); hand-written is only the line itself: tqdm's meter is built to overwrite
    a terminal line and writes durations as clock readings (04:19), where a log wants `4m19s`. The rate
    is the mean since the start (smoothing 0), so the ETA does not swing with validation pauses.
    """

    def __init__(self, *, log: logging.Logger, interval: float, clock: Callable[[], float], **kwargs: Any) -> None:
        self._log = log
        super().__init__(file=io.StringIO(), mininterval=interval, miniters=1, smoothing=0, **kwargs)
        self._time = clock
        self.start_t = self.last_print_t = clock()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Fields show on the next line: a line per change would defeat the interval."""
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """Log the line (tqdm passes msg='' only to erase a bar: nothing to erase in a log)."""
        closing = self.disable  # tqdm's close() disables the bar before its last display
        finished = bool(self.total) and self.n >= self.total
        if msg is None and (closing or not finished):  # the line at total comes from close(), once
            self._log.info(self.line(closing))
        return True

    def line(self, closing: bool = False) -> str:
        """`desc: unit n/total (pct%), rate, ETA | done in | stopped after, postfix`."""
        n, total, elapsed = self.n, self.total, self.format_dict["elapsed"]  # 0 before tqdm's init sets start_t
        parts = [f"{self.desc}: {self.unit} {n}" + (f"/{total} ({int(100 * n / total)}%)" if total else "")]
        rate = (n - self.initial) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts.append(f"{_number(rate)} {self.unit}/s" if rate >= 1 else f"{_number(1 / rate)} s/{self.unit}")
        if closing:
            parts.append(f"{'stopped after' if total and n < total else 'done in'} {format_duration(elapsed)}")
        elif rate > 0 and total:
            parts.append(f"ETA {format_duration(max(total - n, 0) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)


def format_duration(seconds: float) -> str:
    """`42s`, `4m19s`, `2h05m`, `3d04h`: the two leading units, as a reader of a log wants them."""
    s = round(seconds)
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _number(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"
