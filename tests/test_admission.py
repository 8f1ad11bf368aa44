"""Admission against real Redis servers: consumption rules, leases, month rollover, script
cache loss, unreachable and dying servers, the embedded Redis 6.2, and the headers."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis
from prometheus_client import REGISTRY

from gateway import ratelimit_headers
from gateway.admission import (
    QUOTA_GRACE_MS,
    SCRIPT_SHA,
    Admission,
    Decision,
    Policy,
    month_window,
    quota_key,
)
from gateway.breaker import CLOSED, OPEN, Breaker
from gateway.local_limiter import LocalLimiter
from gateway.redis_link import RedisLink, pack
from tenancy.plans import Plan
from tenancy.settings import load_settings

NOV = "2026-11"
FAR = 10**13  # a month reset far in the future, when the test is not about months


def link_for(url: str, connect_timeout_s: float = 0.05) -> RedisLink:
    return RedisLink.from_url(url, connect_timeout_s=connect_timeout_s)


def future_ms() -> int:
    """A test clock a day ahead of real time, so absolute key expiries never fire mid-test."""
    return int(time.time() * 1000) + 86_400_000


@pytest.fixture
async def admission(redis_url: str) -> AsyncIterator[Admission]:
    adm = Admission(link_for(redis_url, 2.0), timeout_ms=2_000)
    yield adm
    await adm.close()


class Clock:
    """A hand-driven monotonic clock, so time-dependent verdicts do not depend on load."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A private redis-server this test may flush, kill and restart; `options` are extra
    redis-server arguments (`--requirepass`, `--unixsocket`)."""

    def __init__(self, *options: str) -> None:
        self.port = _free_port()
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--bind", "127.0.0.1", *self.options],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(100):  # listening means ready (it binds after loading nothing)
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.start()
    yield srv
    srv.stop()


async def test_admits_and_reports_every_policy(admission: Admission) -> None:
    policy = Policy(
        tenant_rate_per_s=10, tenant_burst=5, key_rate_per_s=2, key_burst=3, concurrency=4,
        quotas=(("api_calls", 100, 1),),
    )
    d = await admission.admit("t1", "k1", policy, month=NOV, month_reset_ms=FAR)
    assert d.allowed and d.status == 200 and d.lease_id and not d.degraded
    assert [limit.name for limit in policy.limits] == [
        "tenant-rate", "key-rate", "concurrency", "quota:api_calls",
    ]
    assert d.remaining == (4, 2, 3, 99)


async def test_nothing_consumed_on_denial(admission: Admission, redis_client: redis.Redis) -> None:
    policy = Policy(
        tenant_rate_per_s=100, tenant_burst=50, key_rate_per_s=100, key_burst=50, concurrency=5,
        quotas=(("api_calls", 1000, 1), ("tokens", 2, 1)),
    )
    now = future_ms()

    def state() -> list[object]:
        return [
            redis_client.get("{t:t1}:rate"), redis_client.get("{t:t1}:rate:k:k1"),
            redis_client.zcard("{t:t1}:leases"),
            redis_client.get(quota_key("t1", "api_calls", NOV)),
            redis_client.get(quota_key("t1", "tokens", NOV)),
        ]

    for _ in range(2):
        d = await admission.admit("t1", "k1", policy, month=NOV, month_reset_ms=FAR, now_ms=now)
        assert d.allowed
    before = state()
    assert before[2] == 2 and before[3] == b"2"
    d = await admission.admit("t1", "k1", policy, month=NOV, month_reset_ms=FAR, now_ms=now)
    assert not d.allowed and d.violated == "quota:tokens" and d.status == 429
    assert d.lease_id is None
    assert state() == before


async def test_key_denial_leaves_tenant_budget_alone(
    admission: Admission, redis_client: redis.Redis
) -> None:
    policy = Policy(tenant_rate_per_s=10, tenant_burst=10, key_rate_per_s=1, key_burst=1)
    now = future_ms()
    d = await admission.admit("t1", "k1", policy, month=NOV, month_reset_ms=FAR, now_ms=now)
    assert d.allowed
    tat = redis_client.get("{t:t1}:rate")
    d = await admission.admit("t1", "k1", policy, month=NOV, month_reset_ms=FAR, now_ms=now)
    assert d.violated == "key-rate" and d.retry_after_s == 1
    assert redis_client.get("{t:t1}:rate") == tat
    d = await admission.admit("t1", "k2", policy, month=NOV, month_reset_ms=FAR, now_ms=now)
    assert d.allowed and d.remaining[0] == 8


async def test_leases_release_and_lapse(admission: Admission) -> None:
    policy = Policy(tenant_rate_per_s=1000, tenant_burst=1000, concurrency=2, lease_ttl_ms=500)
    now = future_ms()

    async def admit(at: int) -> Decision:
        return await admission.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR, now_ms=at)

    first, second = await admit(now), await admit(now)
    third = await admit(now + 100)
    assert first.allowed and second.allowed
    assert third.violated == "concurrency" and third.remaining[1] == 0
    await admission.release("t1", first.lease_id)
    assert (await admit(now + 100)).allowed
    # `second` is never released, as if its gateway died: its lease lapses by TTL.
    assert (await admit(now + 499)).violated == "concurrency"
    assert (await admit(now + 500)).allowed


async def test_check_only_meter_refuses_once_recorded_usage_reaches_limit(
    admission: Admission, redis_client: redis.Redis
) -> None:
    policy = Policy(tenant_rate_per_s=100, tenant_burst=100, quotas=(("tokens", 1000, 0),))
    assert (await admission.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR)).allowed
    assert redis_client.get(quota_key("t1", "tokens", NOV)) is None  # checked, not charged
    redis_client.incrby(quota_key("t1", "tokens", NOV), 1000)  # recorded by the usage pipeline
    d = await admission.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR)
    assert d.violated == "quota:tokens"


async def test_quota_rolls_over_at_the_tenants_midnight(admission: Admission) -> None:
    zone = ZoneInfo("Pacific/Auckland")
    # The next Auckland month boundary after tomorrow, so every key expiry lies in the future.
    _, boundary = month_window(zone, future_ms())
    before, after = month_window(zone, boundary - 1), month_window(zone, boundary)
    local = datetime.fromtimestamp(boundary / 1000, zone)
    assert (local.day, local.hour, local.minute) == (1, 0, 0)
    assert datetime.fromtimestamp(boundary / 1000, UTC).day != 1  # not the UTC month boundary
    assert before[1] == boundary and before[0] != after[0] and after[1] > boundary

    policy = Policy(tenant_rate_per_s=1000, tenant_burst=1000, quotas=(("api_calls", 2, 1),))

    async def admit(at: int) -> Decision:
        month, reset = month_window(zone, at)
        return await admission.admit(
            "t1", "k", policy, month=month, month_reset_ms=reset, now_ms=at
        )

    assert (await admit(boundary - 5_000)).allowed
    assert (await admit(boundary - 4_000)).allowed
    refused = await admit(boundary - 3_000)
    assert refused.violated == "quota:api_calls" and refused.retry_after_s == 3
    assert refused.reset_s[-1] == 3
    fresh = await admit(boundary)
    assert fresh.allowed and fresh.remaining[-1] == 1


async def test_month_window_in_utc_and_december() -> None:
    new_years_eve = int(datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp() * 1000)
    month, reset = month_window(ZoneInfo("UTC"), new_years_eve)
    assert month == "2026-12"
    assert reset == int(datetime(2027, 1, 1, tzinfo=UTC).timestamp() * 1000)
    # The per-zone memo must not answer for a time outside the month it remembers.
    december_1 = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp() * 1000)
    for _ in range(2):
        assert month_window(ZoneInfo("UTC"), december_1 - 1)[0] == "2026-11"
        assert month_window(ZoneInfo("UTC"), december_1) == ("2026-12", reset)
        assert month_window(ZoneInfo("UTC"), reset)[0] == "2027-01"


async def test_recovers_from_script_cache_flush(server: Server) -> None:
    adm = Admission(link_for(server.url, 2.0), timeout_ms=2_000)
    policy = Policy(tenant_rate_per_s=100, tenant_burst=100)
    now = future_ms()
    try:
        first = await adm.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR, now_ms=now)
        assert first.allowed
        with redis.Redis(port=server.port) as control:
            control.script_flush()
            assert control.script_exists(SCRIPT_SHA) == [False]
            d = await adm.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR, now_ms=now)
            assert d.allowed and not d.degraded and d.remaining == (98,)
            assert control.script_exists(SCRIPT_SHA) == [True]
    finally:
        await adm.close()


def _unreachable(**kwargs: object) -> Admission:
    return Admission(link_for("redis://127.0.0.1:1/0"), timeout_ms=50, **kwargs)  # type: ignore[arg-type]


async def _bounded(call: object) -> Decision:
    """Every call must return; the generous bound only catches a hang."""
    return await asyncio.wait_for(call, 5)  # type: ignore[arg-type]


async def test_unreachable_fail_open_is_bounded_by_the_local_limit() -> None:
    adm = _unreachable(local=LocalLimiter(clock=Clock()), breaker=Breaker(3, 60))
    policy = Policy(tenant_rate_per_s=100, tenant_burst=100, fail_mode="open", local_rate_per_s=3)
    before = REGISTRY.get_sample_value("tollway_admission_degraded_total", {"outcome": "admitted"})
    try:
        decisions = [
            await _bounded(adm.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR))
            for _ in range(6)
        ]
    finally:
        await adm.close()
    assert all(d.degraded for d in decisions)
    assert [d.allowed for d in decisions] == [True] * 3 + [False] * 3
    assert decisions[-1].violated == "local-rate" and decisions[-1].status == 429
    assert decisions[0].lease_id is None
    after = REGISTRY.get_sample_value("tollway_admission_degraded_total", {"outcome": "admitted"})
    assert after == (before or 0) + 3
    assert adm.breaker.state == OPEN


async def test_unreachable_fail_closed_refuses_with_503() -> None:
    adm = _unreachable()
    policy = Policy(tenant_rate_per_s=100, tenant_burst=100, fail_mode="closed")
    try:
        d = await _bounded(adm.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR))
        await _bounded(adm.release("t1", "lease-that-cannot-be-returned"))
    finally:
        await adm.close()
    assert not d.allowed and d.status == 503 and d.violated == "unavailable" and d.degraded
    body = ratelimit_headers.problem(d)
    assert body["status"] == 503 and body["violated_policy"] == "unavailable"
    assert (b"retry-after", b"2") in ratelimit_headers.headers(d)


async def test_breaker_skips_redis_while_open_and_closes_after_a_good_probe(server: Server) -> None:
    clock = Clock()
    adm = Admission(link_for(server.url, 0.5), timeout_ms=500, breaker=Breaker(2, 5, clock))
    policy = Policy(tenant_rate_per_s=1000, tenant_burst=1000, fail_mode="closed")

    async def admit() -> Decision:
        return await _bounded(adm.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR))

    try:
        assert (await admit()).allowed
        server.stop()
        failures = REGISTRY.get_sample_value("tollway_admission_redis_failures_total") or 0
        assert (await admit()).status == 503
        assert (await admit()).status == 503
        assert adm.breaker.state == OPEN
        assert (await admit()).status == 503  # answered by the open breaker, Redis untouched
        assert REGISTRY.get_sample_value("tollway_admission_redis_failures_total") == failures + 2
        server.start()
        clock.now += 4.9
        assert (await admit()).status == 503
        clock.now += 0.1
        probe = await admit()
        assert probe.allowed and not probe.degraded
        assert adm.breaker.state == CLOSED
    finally:
        await adm.close()


async def test_a_redis_that_stops_answering_opens_the_breaker(server: Server) -> None:
    adm = Admission(link_for(server.url, 2.0), timeout_ms=50, breaker=Breaker(2, 60))
    policy = Policy(tenant_rate_per_s=1000, tenant_burst=1000, fail_mode="closed")
    try:
        assert (await _bounded(adm.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR))).allowed
        with redis.Redis(port=server.port) as control:
            control.client_pause(3_000, all=True)  # connected, but answers nothing
        for _ in range(2):
            d = await _bounded(adm.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR))
            assert d.status == 503 and d.degraded
        assert adm.breaker.state == OPEN
    finally:
        await adm.close()


async def test_server_killed_mid_traffic_holds_the_policy(server: Server) -> None:
    # A generous timeout: this machine is shared, and the healthy phase must not degrade.
    adm = Admission(link_for(server.url, 1.0), timeout_ms=1_000, breaker=Breaker(5, 60))
    policy = Policy(
        tenant_rate_per_s=10_000, tenant_burst=10_000, concurrency=1000, fail_mode="open",
        local_rate_per_s=20,
    )

    decided = 0
    in_flight = asyncio.Event()

    async def worker(n: int) -> list[Decision]:
        nonlocal decided
        out = []
        for _ in range(n):
            d = await adm.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR)
            out.append(d)
            if d.lease_id:
                adm.release_later("t1", d.lease_id)
            decided += 1
            if decided == 120:
                in_flight.set()
            await asyncio.sleep(0)
        return out

    try:
        healthy = await asyncio.wait_for(asyncio.gather(*(worker(10) for _ in range(8))), 10)
        assert all(d.allowed and not d.degraded for batch in healthy for d in batch)
        traffic = asyncio.gather(*(worker(40) for _ in range(8)))
        # Killed with 40 requests of the traffic decided (and more in flight): however fast
        # the link, most of the traffic meets a dead server.
        await asyncio.wait_for(in_flight.wait(), 10)
        server.stop()
        stopped = time.monotonic()
        results = await asyncio.wait_for(traffic, 10)
        elapsed = time.monotonic() - stopped
    finally:
        await adm.close()
    degraded = [d for batch in results for d in batch if d.degraded]
    assert degraded, "the server died mid-test, so some decisions were made without it"
    # Without Redis this node admits at most its local burst (20) plus the refill since.
    assert sum(d.allowed for d in degraded) <= 20 + 20 * elapsed + 1
    assert any(not d.allowed and d.violated == "local-rate" for d in degraded)


async def test_embedded_redis_62_uses_server_time(tmp_path: Path) -> None:
    settings = load_settings(env={}, data_dir=tmp_path / "data", redis_timeout_ms=2_000)
    adm = Admission.from_settings(settings)
    policy = Policy(
        tenant_rate_per_s=0.1, tenant_burst=2, concurrency=1, quotas=(("api_calls", 9, 1),)
    )
    try:
        info = await adm.link.execute(pack(b"INFO", b"server"))
        assert b"\nredis_version:6.2" in info
        first = await adm.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR)
        second = await adm.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR)
        await adm.release("t1", first.lease_id)
        third = await adm.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR)
    finally:
        await adm.close()
    assert first.allowed and second.violated == "concurrency" and third.allowed
    assert third.remaining == (0, 0, 7)


async def test_deny_cache_answers_repeat_refusals_locally(admission: Admission) -> None:
    policy = Policy(tenant_rate_per_s=0.5, tenant_burst=1)
    hits = REGISTRY.get_sample_value("tollway_admission_deny_cache_hits_total") or 0
    now = future_ms()

    async def admit(at: int, pol: Policy = policy) -> Decision:
        return await admission.admit("t1", "k", pol, month=NOV, month_reset_ms=FAR, now_ms=at)

    assert (await admit(now)).allowed
    for step in (0, 500, 1_500):
        d = await admit(now + step)
        assert d.violated == "tenant-rate"
    assert d.retry_after_s == 1
    assert REGISTRY.get_sample_value("tollway_admission_deny_cache_hits_total") == hits + 2
    assert (await admit(now + 2_000)).allowed
    # A new snapshot's policy object bypasses the cache and asks Redis.
    other_policy = Policy(tenant_rate_per_s=0.5, tenant_burst=1)
    assert (await admit(now + 2_000, other_policy)).violated == "tenant-rate"


def test_policy_from_plan_charges_the_request_meter_and_checks_the_rest() -> None:
    plan = Plan(
        plan_id="starter", version=1, name="Starter", price=None, currency="USD",
        interval="month", trial_days=0, rate_per_second=10, burst=20, concurrency=10,
        fail_mode="open", local_rate_per_second=5,
        quotas={"api_calls": 10_000, "ai_interactions": 1_000},
        users=None, storage_gb=None, features=(), upstream=None,
    )
    policy = Policy.from_plan(plan, key_rate_per_s=5, key_burst=10)
    assert policy.quotas == (("ai_interactions", 1_000, 0), ("api_calls", 10_000, 1))
    assert (policy.tenant_rate_per_s, policy.tenant_burst, policy.concurrency) == (10, 20, 10)
    assert (policy.fail_mode, policy.local_rate_per_s) == ("open", 5)
    assert policy.policy_field == (
        b'"tenant-rate";q=20;w=2, "key-rate";q=10;w=2, "concurrency";q=10, '
        b'"quota:ai_interactions";q=1000;w=2592000, "quota:api_calls";q=10000;w=2592000'
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"fail_mode": "maybe"}, {"tenant_burst": 0}, {"key_rate_per_s": -1},
     {"quotas": (("", 1, 1),)}, {"concurrency": 2, "lease_ttl_ms": 0}],
)
def test_policy_rejects_nonsense(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"tenant_rate_per_s": 1, "tenant_burst": 1}
    with pytest.raises(ValueError):
        Policy(**(base | kwargs))  # type: ignore[arg-type]


def test_headers_name_the_policy_closest_to_exhaustion() -> None:
    policy = Policy(
        tenant_rate_per_s=100, tenant_burst=100, concurrency=10,
        quotas=(("api_calls", 10_000, 1),),
    )
    ok = Decision(True, 200, None, 0, policy, (90, 2, 5_000), (1, None, 86_400))
    assert ratelimit_headers.headers(ok) == [
        (b"ratelimit-policy",
         b'"tenant-rate";q=100;w=1, "concurrency";q=10, "quota:api_calls";q=10000;w=2592000'),
        (b"ratelimit", b'"concurrency";r=2'),
    ]
    refused = Decision(False, 429, "quota:api_calls", 86_400, policy, (90, 9, 0), (1, None, 86_400))
    assert ratelimit_headers.headers(refused)[1:] == [
        (b"ratelimit", b'"quota:api_calls";r=0;t=86400'),
        (b"retry-after", b"86400"),
    ]
    body = ratelimit_headers.problem(refused)
    assert body["type"].endswith("/quota-exceeded") and body["violated_policy"] == "quota:api_calls"
    assert body["status"] == 429 and body["retry_after"] == 86_400


async def test_charge_adds_recorded_units_to_the_checked_meter(
    admission: Admission, redis_client: redis.Redis
) -> None:
    policy = Policy(tenant_rate_per_s=100, tenant_burst=100, quotas=(("tokens", 1000, 0),))
    reset = future_ms()
    await admission.charge("t1", [("tokens", 600), ("ai_interactions", 2)], NOV, reset)
    await admission.charge("t1", [("tokens", 400)], NOV, reset)
    key = quota_key("t1", "tokens", NOV)
    assert redis_client.get(key) == b"1000"
    assert redis_client.get(quota_key("t1", "ai_interactions", NOV)) == b"2"
    assert redis_client.pexpiretime(key) == reset + QUOTA_GRACE_MS
    d = await admission.admit("t1", "k", policy, month=NOV, month_reset_ms=FAR)
    assert d.violated == "quota:tokens"


async def test_charge_failure_is_logged_and_tolerated(caplog: pytest.LogCaptureFixture) -> None:
    adm = _unreachable()
    try:
        await _bounded(adm.charge("t1", [("tokens", 5)], NOV, FAR))
    finally:
        await adm.close()
    assert "could not add reported units to t1's quota counters" in caplog.text
