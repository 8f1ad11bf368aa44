"""A consecutive-failure circuit breaker for the admission call to Redis.

While Redis is down every request would otherwise wait out the full timeout; an open breaker
answers immediately from the failure policy instead. After `reset_s` one request probes Redis.
A probe that never reports (its task was cancelled) is replaced by another after `reset_s`,
so the breaker cannot wedge half-open.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


class Breaker:
    __slots__ = ("_clock", "_failures", "_opened_at", "_probe_at", "reset_s", "state", "threshold")

    def __init__(
        self, threshold: int, reset_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = max(1, threshold)
        self.reset_s = reset_s
        self.state = CLOSED
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._probe_at = 0.0

    def allow(self) -> bool:
        """Whether this request may call Redis; in half-open, only the one probe may."""
        if self.state == CLOSED:
            return True
        now = self._clock()
        if self.state == OPEN:
            if now - self._opened_at < self.reset_s:
                return False
            self.state = HALF_OPEN
        elif now - self._probe_at < self.reset_s:
            return False
        self._probe_at = now
        return True

    def success(self) -> None:
        self.state = CLOSED
        self._failures = 0

    def failure(self) -> None:
        self._failures += 1
        if self.state == HALF_OPEN or self._failures >= self.threshold:
            self.state = OPEN
            self._opened_at = self._clock()
