"""The circuit breaker and the fail-open local limiter, on a hand-driven clock."""

from __future__ import annotations

from gateway.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from gateway.local_limiter import LocalLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_only() -> None:
    clock = Clock()
    breaker = Breaker(3, 2.0, clock)
    breaker.failure()
    breaker.failure()
    breaker.success()  # a success resets the run of failures
    breaker.failure()
    breaker.failure()
    assert breaker.state == CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state == OPEN
    assert not breaker.allow()


def test_half_open_lets_one_probe_through() -> None:
    clock = Clock()
    breaker = Breaker(1, 2.0, clock)
    breaker.failure()
    clock.now += 1.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.allow()  # the probe
    assert breaker.state == HALF_OPEN
    assert not breaker.allow()  # everyone else waits for it
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow()


def test_failed_probe_reopens_for_a_full_period() -> None:
    clock = Clock()
    breaker = Breaker(1, 2.0, clock)
    breaker.failure()
    clock.now += 2.0
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == OPEN
    clock.now += 1.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()


def test_lost_probe_is_replaced_after_the_reset_period() -> None:
    clock = Clock()
    breaker = Breaker(1, 2.0, clock)
    breaker.failure()
    clock.now += 2.0
    assert breaker.allow()  # this probe's task is cancelled and never reports
    clock.now += 1.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()


def test_local_limiter_bounds_each_tenant() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    assert sum(limiter.take("a", 5) for _ in range(20)) == 5
    assert sum(limiter.take("b", 5) for _ in range(20)) == 5  # tenants are independent
    clock.now += 0.4
    assert sum(limiter.take("a", 5) for _ in range(20)) == 2
    assert not limiter.take("a", 0)  # no local rate declared: nothing is admitted blind


def test_local_limiter_slow_rate_still_admits_and_table_is_bounded() -> None:
    clock = Clock()
    limiter = LocalLimiter(max_tenants=2, clock=clock)
    assert limiter.take("a", 0.5)
    assert not limiter.take("a", 0.5)
    clock.now += 2.0
    assert limiter.take("a", 0.5)
    limiter.take("b", 1)
    limiter.take("c", 1)
    assert len(limiter._buckets) == 2 and "a" not in limiter._buckets
