"""Progress of long loops: a tqdm bar on a terminal, a few plain lines anywhere else (a log file, a pipe, CI).

A tqdm bar redraws itself with carriage returns; written to a file it becomes one line of thousands of
characters. So `progress_bar` draws a bar only when its stream is a terminal; otherwise `PlainProgress` writes
one line at 25, 50, 75 and 100 % of a known total (and one at least every `interval` seconds between them),
or, for a loop of unknown length, one line when it ends (and one every `interval` seconds before that).

    for job in progress_bar(jobs, desc="ddpm s0 extract train", unit="fwd"):
        ...
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TextIO

__all__ = ["progress_bar", "PlainProgress", "labelled", "QUARTERS", "DEFAULT_INTERVAL_S"]

QUARTERS = (25, 50, 75, 100)  # the percentages at which a known total gets a plain line
DEFAULT_INTERVAL_S = 60.0  # the longest silence between plain lines while a loop runs


class PlainProgress:
    """tqdm's interface (iteration, update, set_postfix, close, context manager) writing plain lines.

    Lines look like `ddpm s0 extract test: 8/15 fwd (53%), 12 s` or, without a total,
    `ddpm s0 member 3/10: 811 it, 3 s, epoch=5, loss=0.1198`; at most len(QUARTERS) lines for a known total,
    plus one per `interval` seconds of running."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, desc: str = "", total: int | None = None,
                 unit: str = "it", stream: TextIO | None = None, interval: float = DEFAULT_INTERVAL_S):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.n = 0
        self.postfix = ""
        self.started = self.last_line = time.monotonic()
        self.next_quarter = 0  # index into QUARTERS of the next mark to report
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("PlainProgress: nothing to iterate (created without an iterable)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.total:
            reached = False
            while self.next_quarter < len(QUARTERS) and 100 * self.n >= QUARTERS[self.next_quarter] * self.total:
                self.next_quarter += 1
                reached = True
            if reached:
                self._line(now)
                return
        if now - self.last_line >= self.interval:
            self._line(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.total == 0:  # an empty loop: nothing to report
            return
        if self.total is None or self.next_quarter < len(QUARTERS):  # the end was not reported by a quarter mark
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        if self.total:
            done = f"{self.n}/{self.total} {self.unit} ({100 * self.n // self.total}%)"
        else:
            done = f"{self.n} {self.unit}"
        extra = f", {self.postfix}" if self.postfix else ""
        self.stream.write(f"{self.desc}: {done}, {now - self.started:.0f} s{extra}\n")
        self.stream.flush()
        self.last_line = now


def labelled(label: str, what: str) -> str:
    """A bar's description: which run (`label`, e.g. "ddpm s0"; may be empty) and what it counts."""
    return f"{label} {what}" if label else what


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
                 enabled: bool = True, leave: bool = True, stream: TextIO | None = None,
                 interval: float = DEFAULT_INTERVAL_S) -> Any:
    """A progress reporter for a loop: tqdm when `stream` (default stderr) is a terminal, PlainProgress otherwise;
    with enabled=False a disabled tqdm (nothing written). Wrap an iterable or call update(n) / close().

    leave: keep the finished bar on the terminal (tqdm only; a plain line always stays)."""
    stream = stream if stream is not None else sys.stderr
    if enabled and not _is_terminal(stream):
        return PlainProgress(iterable, desc=desc, total=total, unit=unit, stream=stream, interval=interval)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=stream, disable=not enabled)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
