"""The metering worker loop: Redis Streams into ClickHouse until told to stop.

`tollway worker` runs it alone (`main_worker`); `tollway serve` embeds `run_worker` in its
own event loop, since a chDB directory can be opened by one process only. Several workers can
share the streams: each is its own consumer of the group, named host-pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time

import redis.asyncio as aioredis
from clickhouse_connect.driver.exceptions import Error as ClickHouseError
from redis.exceptions import RedisError

from metering import clickhouse
from metering.consumer import UsageConsumer
from metering.migrations import migrate
from tenancy.hotstate import redis_url
from tenancy.settings import Settings, load_settings

log = logging.getLogger("tollway.metering")

TRIM_EVERY_S = 5.0
RETRY_AFTER_S = 1.0


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def run_worker(settings: Settings, stop_event: asyncio.Event) -> None:
    client = aioredis.Redis.from_url(
        redis_url(settings), socket_timeout=10.0, socket_connect_timeout=2.0
    )
    ch = clickhouse.connect(settings)
    await clickhouse.run_blocking(migrate, ch, settings)
    consumer = UsageConsumer(
        client,
        ch,
        shards=settings.usage_shards,
        name=consumer_name(),
        batch=settings.consumer_batch,
        claim_idle_ms=settings.usage_claim_idle_ms,
    )
    idle_s = settings.usage_flush_ms / 1000
    claim_every_s = max(settings.usage_claim_idle_ms / 2000, idle_s)
    next_claim = next_trim = 0.0
    recover = True
    log.info("metering worker %s started", consumer.name)
    try:
        while not stop_event.is_set():
            try:
                if recover:
                    await consumer.setup()
                    await consumer.recover_own()
                    recover = False
                handled = await consumer.poll()
                now = time.monotonic()
                if now >= next_claim:
                    handled += await consumer.claim()
                    next_claim = now + claim_every_s
                if now >= next_trim:
                    await consumer.trim()
                    await consumer.observe_lag()
                    next_trim = now + TRIM_EVERY_S
            except (RedisError, OSError, ClickHouseError) as exc:
                # The batch in hand stays pending with its record; redo it once things answer.
                log.warning("metering worker: %s; retrying", exc)
                recover = True
                await _sleep(stop_event, RETRY_AFTER_S)
                continue
            if not handled:
                await _sleep(stop_event, idle_s)
    finally:
        await client.aclose()
        log.info("metering worker %s stopped", consumer.name)


async def _sleep(stop_event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop_event.wait(), seconds)


def main_worker(settings: Settings) -> None:
    """Run the worker in the foreground until SIGINT or SIGTERM, then finish the batch."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop)

    try:
        asyncio.run(main())
    finally:
        clickhouse.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main_worker(load_settings())
