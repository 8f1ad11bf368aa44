"""Per-node token buckets that bound fail-open admission while Redis is unreachable.

Each gateway node admits at most `rate` requests per second per tenant (with a burst of one
second's worth, at least one) on its own, so an outage costs at most nodes x rate, never
unlimited. The table is bounded: when full, the least recently seen tenant is forgotten, which
can only grant it one fresh burst.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class LocalLimiter:
    __slots__ = ("_buckets", "_clock", "max_tenants")

    def __init__(self, max_tenants: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.max_tenants = max_tenants
        self._clock = clock
        # tenant -> [tokens, last refill time]; dict order is least recently touched first.
        self._buckets: dict[str, list[float]] = {}

    def take(self, tenant_id: str, rate: float) -> bool:
        if rate <= 0:
            return False
        now = self._clock()
        burst = max(rate, 1.0)
        bucket = self._buckets.pop(tenant_id, None)
        if bucket is None:
            if len(self._buckets) >= self.max_tenants:
                del self._buckets[next(iter(self._buckets))]
            bucket = [burst, now]
        else:
            bucket[0] = min(burst, bucket[0] + (now - bucket[1]) * rate)
            bucket[1] = now
        self._buckets[tenant_id] = bucket
        if bucket[0] < 1.0:
            return False
        bucket[0] -= 1.0
        return True
