"""A bytes-written progress bar on a terminal; silent otherwise."""

import sys
import time


class Progress:
    """Callable with the number of bytes just written; draws at most every `interval` s."""

    def __init__(self, stream=sys.stderr, *, enabled: bool | None = None, interval: float = 0.2):
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.total = self.done = 0
        self._interval = interval
        self._start = self._last = time.perf_counter()

    def start(self, total: int) -> None:
        self.total, self.done = total, 0
        self._start = self._last = time.perf_counter()

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self._interval or self.done >= self.total):
            self._last = now
            frac = min(1.0, self.done / self.total) if self.total else 1.0
            rate = self.done / max(now - self._start, 1e-9) / 1e6
            self.stream.write(
                f"\r[{'#' * int(30 * frac):<30}] {self.done / 1e9:6.2f}/{self.total / 1e9:.2f} GB"
                f" {rate:7.0f} MB/s"
            )
            self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")
