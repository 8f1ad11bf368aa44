"""Usage pipeline throughput and latency: Redis Streams into chDB with one worker process.

Phase 1 (throughput): N events are written straight into the shard streams, then one
UsageConsumer drains them into a fresh chDB directory; events/s = N / drain time.
Phase 2 (latency): a UsageEmitter emits at a fixed rate while run_worker consumes in the
same process; write→queryable = ingested_at − time per row (ingested_at is set by the insert
that made the row visible), reported as p50/p99 from ClickHouse.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_consumer.py --events 200000 --batch 20000
    PYTHONPATH=. .venv/bin/python benchmarks/bench_consumer.py --decode python --skip-latency

Worker process CPU is user+sys of the whole process (chDB's threads included) per event.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from gateway.spool import Spool
from gateway.usage_emitter import UsageEmitter
from metering import clickhouse
from metering.consumer import UsageConsumer
from metering.events import FIELD, UsageEvent, shard_for, stream_key
from metering.migrations import migrate
from metering.worker import run_worker
from tenancy.settings import load_settings


def _event(i: int, now_ms: int) -> UsageEvent:
    return UsageEvent(
        tenant_id=f"tenant-{i % 200}",
        meter="requests",
        subject=f"key_{i % 1000}",
        time_ms=now_ms,
        route="/v1/items/{id}",
        method="GET",
        status=200,
        latency_ms=3.5,
        bytes_in=120,
        bytes_out=2048,
        dims={"region": "eu-west-1"},
    )


def prefill(url: str, n: int, shards: int) -> None:
    client = redis.Redis.from_url(url)
    now_ms = int(time.time() * 1000)
    for start in range(0, n, 10_000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + 10_000)):
            event = _event(i, now_ms)
            pipe.xadd(stream_key(shard_for(event.tenant_id, shards)), {FIELD: event.to_bytes()})
        pipe.execute()
    client.close()


async def throughput(
    url: str, settings_kw: dict[str, object], n: int, batch: int, in_clickhouse: bool
) -> float:
    settings = load_settings(env={}, **settings_kw)  # type: ignore[arg-type]
    ch = clickhouse.connect(settings)
    migrate(ch, settings)
    client = aioredis.Redis.from_url(url)
    consumer = UsageConsumer(
        client,
        ch,
        shards=settings.usage_shards,
        name="bench",
        batch=batch,
        claim_idle_ms=60_000,
        decode_in_clickhouse=in_clickhouse,
    )
    await consumer.setup()
    prefill(url, n, settings.usage_shards)
    cpu = os.times()
    started = time.perf_counter()
    done = 0
    while done < n:
        done += await consumer.poll()
    elapsed = time.perf_counter() - started
    used = os.times()
    cpu_us = 1e6 * (used.user - cpu.user + used.system - cpu.system) / n
    rows = ch.query("SELECT count() FROM usage_events").result_rows[0][0]
    assert rows == n, (rows, n)
    await client.aclose()
    total_s = REGISTRY.get_sample_value("tollway_usage_insert_seconds_sum") or 0.0
    count = REGISTRY.get_sample_value("tollway_usage_insert_seconds_count") or 0.0
    print(  # insert time includes waiting for the process's one ClickHouse handle
        f"  {count:.0f} inserts, mean {1000 * total_s / max(count, 1):.1f} ms, "
        f"{total_s:.2f} s of {elapsed:.2f} s; worker process CPU {cpu_us:.1f} µs/event"
    )
    return n / elapsed


async def latency(url: str, settings_kw: dict[str, object], rate: int, seconds: float) -> str:
    settings = load_settings(env={}, **settings_kw)  # type: ignore[arg-type]
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop))
    spool = Spool.open(Path(str(settings_kw["data_dir"])) / "spool", 1 << 26)
    emitter = UsageEmitter(
        aioredis.Redis.from_url(url),
        spool,
        shards=settings.usage_shards,
        flush_ms=settings.usage_flush_ms,
        batch=settings.usage_batch,
    )
    emitter.start()
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    total = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        now_ms = int(time.time() * 1000)
        for _ in range(per_tick):
            emitter.emit(_event(total, now_ms))
            total += 1
        await asyncio.sleep(tick - (time.perf_counter() - started) % tick)
    await emitter.aclose()
    ch = clickhouse.connect(settings)
    while True:
        rows = await clickhouse.run_blocking(
            ch.query, "SELECT count() FROM usage_events WHERE source = 'gateway'"
        )
        if rows.result_rows[0][0] >= total:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await worker
    q = ch.query(
        "SELECT quantiles(0.5, 0.99, 1)(dateDiff('millisecond', time, ingested_at)) "
        "FROM usage_events"
    ).result_rows[0][0]
    achieved = total / (time.perf_counter() - started)
    return (
        f"{total} events at ~{achieved:,.0f}/s offered: write→queryable "
        f"p50 {q[0]:.0f} ms, p99 {q[1]:.0f} ms, max {q[2]:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--rate", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--decode",
        choices=["clickhouse", "python"],
        default="clickhouse",
        help="phase 1 only: where events are decoded (python = the path before insert_lines.sql)",
    )
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    redis.Redis.from_url(args.redis).flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        kw: dict[str, object] = {
            "data_dir": Path(tmp) / "data",
            "redis_url": args.redis,
            "clickhouse_url": f"chdb://{tmp}/chdb",
            "usage_batch": args.batch,
        }
        in_ch = args.decode == "clickhouse"
        rate = asyncio.run(throughput(args.redis, kw, args.events, args.batch, in_ch))
        print(
            f"throughput ({args.decode} decodes): {args.events} events, batch {args.batch}: "
            f"{rate:,.0f} events/s"
        )
        clickhouse.close()
    redis.Redis.from_url(args.redis).flushdb()
    if args.skip_latency:
        return
    with tempfile.TemporaryDirectory() as tmp:
        kw = {
            "data_dir": Path(tmp) / "data",
            "redis_url": args.redis,
            "clickhouse_url": f"chdb://{tmp}/chdb",
            "usage_batch": args.batch,
        }
        print("latency:", asyncio.run(latency(args.redis, kw, args.rate, args.seconds)))
        clickhouse.close()
    redis.Redis.from_url(args.redis).flushdb()


if __name__ == "__main__":
    main()
