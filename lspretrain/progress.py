"""Progress lines for long loops: "what done/total (rate/s, ETA s)" at most every ``every_s``
seconds, so a minutes-long extraction or conversion never runs silently."""
from __future__ import annotations

import logging
import time

__all__ = ["Progress"]


class Progress:
    def __init__(self, what: str, total: int | None, every_s: float = 10.0, logger: logging.Logger | None = None,
                 unit: str = ""):
        self.what, self.total, self.every_s, self.unit = what, total, every_s, unit
        self.log = logger or logging.getLogger("lspretrain")
        self.done = 0
        self.start = self._last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self.log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            return f"{self.what} {self.done}/{self.total}{unit} ({rate:.0f}/s, ETA {eta:.0f} s)"
        return f"{self.what} {self.done}{unit} ({rate:.0f}/s)"
