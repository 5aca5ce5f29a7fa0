"""Warnings a peer can cause at will, at most one line per peer per interval.

A hostile or broken peer can send thousands of refused messages a second; one log line each
would let it fill the disk and drown everything else (the red team's flood wrote 16,000
lines in 20 s). Each refusal still counts in the metrics; the log says it once per interval
per key (a peer name or source address), and the next line says how many it held back.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

INTERVAL_S = 10.0
MAX_KEYS = 1024  # keys remembered; the oldest is forgotten (it may log once more)


class QuietLog:
    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()  # last line, held back

    def warning(self, key: str, fmt: str, *args: object) -> bool:
        """Log ``fmt % args`` unless ``key`` logged within the interval; True if it did."""
        now = self.clock()
        last, held = self._seen.get(key, (None, 0))
        if last is not None and now - last < self.interval_s:
            self._seen[key] = (last, held + 1)
            return False
        if held and last is not None:
            fmt += " (and %d more from this peer in the last %.0fs)"
            args = (*args, held, now - last)
        self.logger.warning(fmt, *args)
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        while len(self._seen) > MAX_KEYS:
            self._seen.popitem(last=False)
        return True


__all__ = ["INTERVAL_S", "QuietLog"]
