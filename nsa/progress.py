"""Progress of long work (tuning, benchmarking, training): a tqdm bar on a terminal, plain lines in a log.

tqdm on a stderr that is not a terminal either stays silent (disable=None) or writes carriage-return frames
that a CI log shows as one unreadable line. A GPU runner's log is where `nsa run` spends its half hour, so
there `progress_bar` prints one line at most every `interval` seconds, and one when the work ends:
`tune paper: 120/1574 cand (7.6%), 2m10s elapsed, about 26m left [selection|T=4096|...]`.
"""

from __future__ import annotations

import sys
import time

LOG_INTERVAL_S = 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class LineProgress:
    """The part of tqdm's interface that nsa uses, written as plain lines to `file`."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", initial=0, interval=LOG_INTERVAL_S,
                 file=None):
        self.iterable = iterable
        self.total = total if total is not None or iterable is None else len(iterable)
        self.desc, self.unit, self.n, self.interval = desc, unit, initial, interval
        self.file = file if file is not None else sys.stderr
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.initial = initial
        self.closed = False
        self.written = None  # the count of the last line written

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._write()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.written != self.n:
                self._write()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        text = f"{self.desc}: {self.n}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.n / self.total:.1f}%)"
        else:
            text += f" {self.unit}"
        text += f", {_duration(elapsed)} elapsed"
        done = self.n - self.initial
        if self.total and 0 < done and self.n < self.total:
            text += f", about {_duration(elapsed / done * (self.total - self.n))} left"
        return text + (f" [{self.postfix}]" if self.postfix else "")

    def _write(self) -> None:
        self.last, self.written = time.monotonic(), self.n
        print(self.line(), file=self.file, flush=True)


def progress_bar(iterable=None, *, total=None, desc="", unit="it", initial=0, enabled=True, leave=True):
    """tqdm when stderr is a terminal, LineProgress lines when it is not, nothing when not `enabled`."""
    from tqdm.auto import tqdm
    if enabled and not sys.stderr.isatty():
        return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=not enabled, leave=leave)
