"""Redis dies under the gateway: a private redis-server is killed mid-test and restarted.

Fail-open plans keep serving up to the per-node local limit and then answer 429; fail-closed
plans answer 503; nothing hangs; usage events go to the spool and are replayed when Redis
is back."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import REGISTRY
from test_gateway_e2e import PLANS, Stack, Upstream, make_stack, new_tenant

from metering.events import FIELD, UsageEvent, shard_for, stream_key
from tenancy import plans
from tenancy.controlplane import ControlPlane

HANG_GUARD_S = 5.0


class PrivateRedis:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        try:
            for _ in range(200):
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.02)
            raise RuntimeError("private redis-server did not start")
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.close()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def call(stack: Stack, secret: str) -> httpx.Response:
    return await asyncio.wait_for(
        stack.client.get("/work", headers={"X-API-Key": secret}), HANG_GUARD_S)


def stream_events(url: str, tenant_id: str, shards: int) -> list[UsageEvent]:
    client = redis.Redis.from_url(url)
    try:
        entries: Any = client.xrange(stream_key(shard_for(tenant_id, shards)))
    finally:
        client.close()
    found = [UsageEvent.from_bytes(fields[FIELD]) for _, fields in entries]
    return [e for e in found if e.tenant_id == tenant_id]


async def test_redis_outage_fails_open_within_the_local_limit_closed_with_503_and_replays(
    sqlite_cp: ControlPlane, tmp_path: Any, private_redis: PrivateRedis, upstream: Upstream
) -> None:
    plans.apply(sqlite_cp, {"plans": PLANS}, "test")
    open_id, open_key = new_tenant(sqlite_cp, "opener", "open", upstream.url)
    _, closed_key = new_tenant(sqlite_cp, "closer", "roomy", upstream.url)
    local_rate = PLANS["open"]["limits"]["local_rate_per_second"]
    async for stack in make_stack(sqlite_cp, tmp_path, redis_url=private_redis.url,
                                  redis_timeout_ms=200):
        shards = stack.settings.usage_shards
        assert (await call(stack, open_key)).status_code == 200
        assert (await call(stack, closed_key)).status_code == 200
        await stack.gateway.emitter.flush()  # these land in the Redis about to die

        private_redis.kill()
        degraded = sample("tollway_admission_degraded_total", outcome="admitted")
        started = time.monotonic()
        codes = [(await call(stack, open_key)).status_code for _ in range(12)]
        elapsed = time.monotonic() - started
        served = codes.count(200)
        assert 1 <= served <= local_rate + local_rate * elapsed + 1, codes
        assert set(codes) == {200, 429}, codes
        refused = await call(stack, open_key)
        if refused.status_code == 429:
            assert refused.json()["violated_policy"] == "local-rate"
            assert "retry-after" in refused.headers
        else:
            served += 1  # the local bucket refilled meanwhile
        assert sample("tollway_admission_degraded_total", outcome="admitted") >= degraded + served
        assert sample("tollway_gateway_admission_decisions_total", outcome="allowed", policy="",
                      degraded="true") >= served

        closed = await call(stack, closed_key)
        assert closed.status_code == 503
        assert closed.json()["violated_policy"] == "unavailable"
        assert int(closed.headers["retry-after"]) >= 1

        await stack.gateway.emitter.flush()
        assert sample("tollway_usage_spool_bytes") > 0

        private_redis.start()  # empty: the events before the outage died with the old server
        for _ in range(100):
            await asyncio.sleep(0.1)
            await stack.gateway.emitter.flush()
            if sample("tollway_usage_spool_bytes") == 0:
                break
        replayed = stream_events(private_redis.url, open_id, shards)
        assert len(replayed) == served
        assert all(e.status == 200 and e.meter == "api_calls" for e in replayed)

        for _ in range(50):  # the breaker lets a probe through after breaker_reset_s
            r = await call(stack, closed_key)
            if r.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 200
