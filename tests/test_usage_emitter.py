from __future__ import annotations

import asyncio
import shutil
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from gateway.spool import Spool
from gateway.usage_emitter import UsageEmitter
from metering.events import UsageEvent, shard_for, stream_key
from tenancy.settings import load_settings

SHARDS = 4


def _xrange(client: redis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    entries: Any = client.xrange(key)
    return list(entries)


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def _emitter(
    url: str, spool_dir: Path, *, flush_ms: int = 60_000, batch: int = 5000
) -> UsageEmitter:
    client = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    spool = Spool.open(spool_dir, 1 << 26)
    return UsageEmitter(client, spool, shards=SHARDS, flush_ms=flush_ms, batch=batch)


def _events(n: int, prefix: str = "t") -> list[UsageEvent]:
    return [
        UsageEvent(
            tenant_id=f"{prefix}{i % 7}",
            meter="requests",
            subject="k",
            time_ms=1_700_000_000_000 + i,
        )
        for i in range(n)
    ]


def _stream_ids(client: redis.Redis) -> list[str]:
    """Event ids in the streams, checking each landed on its tenant's shard."""
    found = []
    for shard in range(SHARDS):
        for _id, fields in _xrange(client, stream_key(shard)):
            doc = orjson.loads(fields[b"e"])
            assert shard_for(doc["tenant_id"], SHARDS) == shard
            found.append(doc["event_id"])
    return found


async def test_graceful_shutdown_flushes_everything(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    emitter = _emitter(redis_url, tmp_path)
    emitter.start()
    events = _events(1234)
    for event in events:
        emitter.emit(event)
    assert _stream_ids(redis_client) == []  # the interval is a minute: nothing sent yet
    await emitter.aclose()
    assert Counter(_stream_ids(redis_client)) == Counter(e.event_id for e in events)


async def test_a_full_batch_is_sent_without_waiting_for_the_interval(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    emitter = _emitter(redis_url, tmp_path, batch=100)
    emitter.start()
    for event in _events(100):
        emitter.emit(event)
    for _ in range(200):
        if len(_stream_ids(redis_client)) == 100:
            break
        await asyncio.sleep(0.01)
    assert len(_stream_ids(redis_client)) == 100
    await emitter.aclose()


async def test_redis_down_spools_then_replays_in_order_without_loss(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    down = _emitter(_closed_port_url(), tmp_path)
    down.start()
    early = _events(500, "a")
    for event in early:
        down.emit(event)
    await down.flush()
    assert down._spool.size > 0
    await down.aclose()  # Redis still down: everything stays in the spool
    spooled = next(tmp_path.glob("usage-*.spool"))
    assert spooled.stat().st_size > 0
    assert _stream_ids(redis_client) == []

    up = _emitter(redis_url, tmp_path)  # a restarted gateway adopts the spool
    late = _events(10, "a")
    for event in late:
        up.emit(event)
    await up.flush()
    assert spooled.stat().st_size == 0
    ids = _stream_ids(redis_client)
    assert Counter(ids) == Counter(e.event_id for e in early + late)
    order = {e.event_id: i for i, e in enumerate(early + late)}
    for shard in range(SHARDS):
        shard_ids = [
            orjson.loads(f[b"e"])["event_id"] for _, f in _xrange(redis_client, stream_key(shard))
        ]
        assert shard_ids == sorted(shard_ids, key=order.__getitem__)
    await up.aclose()


async def test_replaying_a_batch_that_already_landed_adds_nothing(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    down = _emitter(_closed_port_url(), tmp_path / "a")
    events = _events(300)
    for event in events:
        down.emit(event)
    await down.aclose()
    # Keep a copy of the spool, as if the process died after sending it but before truncating.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for directory in ("a", "b"):
        replayer = _emitter(redis_url, tmp_path / directory)
        await replayer.aclose()
    assert Counter(_stream_ids(redis_client)) == Counter(e.event_id for e in events)


async def test_a_full_buffer_drops_and_counts_instead_of_growing(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    emitter = UsageEmitter(
        client,
        Spool.open(tmp_path, 1 << 20),
        shards=SHARDS,
        flush_ms=60_000,
        batch=5,
        max_pending=10,
    )
    before = REGISTRY.get_sample_value(
        "tollway_usage_events_dropped_total", {"reason": "buffer_full"}
    )
    for event in _events(15):
        emitter.emit(event)
    after = REGISTRY.get_sample_value(
        "tollway_usage_events_dropped_total", {"reason": "buffer_full"}
    )
    assert (after or 0) - (before or 0) == 5
    await emitter.aclose()
    assert len(_stream_ids(redis_client)) == 10


async def test_a_flushed_script_cache_is_reloaded_not_spooled(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    redis_client.script_flush()  # as after a Redis restart
    emitter = _emitter(redis_url, tmp_path)
    for event in _events(50):
        emitter.emit(event)
    await emitter.flush()
    assert emitter._spool.size == 0
    assert len(_stream_ids(redis_client)) == 50
    await emitter.aclose()


async def test_from_settings_builds_a_working_emitter(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    settings = load_settings(env={}, data_dir=tmp_path / "data", redis_url=redis_url)
    emitter = UsageEmitter.from_settings(settings)
    emitter.start()
    for event in _events(20):
        emitter.emit(event)
    await emitter.aclose()
    assert len(_stream_ids(redis_client)) == 20
    assert list((tmp_path / "data" / "spool").glob("usage-*.spool"))
