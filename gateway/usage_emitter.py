"""Usage events from the request path to Redis Streams, in batches, with a local spool.

`emit` only appends to a list: the request path never waits on Redis. A background task
flushes every `usage_flush_ms`, or sooner once `usage_batch` events wait, grouping events by
tenant-affine shard and sending each shard's batch through usage_append.lua, all shards in one
pipelined round trip.

Each batch carries this process's producer id and a sequence number. When a send fails
(timeout, refused connection, Redis error), the batch goes to the spool with the same id and
number; the script skips any batch whose number Redis already recorded, so replaying a batch
that had in fact landed adds nothing. While the spool holds data, new batches are spooled
behind it, so each shard's events keep their order.

A crash loses what is still in memory: at most one flush interval of events (or
`usage_batch` events, whichever comes first) plus the batch being sent. See
docs/usage-pipeline.md for the measured figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import NoScriptError, RedisError

from gateway.spool import Spool, SpooledBatch
from metering.events import UsageEvent, shard_for, stream_key
from tenancy.hotstate import redis_url
from tenancy.settings import Settings

log = logging.getLogger("tollway.usage")

EMITTED = Counter("tollway_usage_events_emitted", "Usage events accepted from the request path")
FLUSHED = Counter("tollway_usage_events_flushed", "Usage events written to Redis Streams")
SPOOLED = Counter("tollway_usage_events_spooled", "Usage events written to the local spool")
DROPPED = Counter("tollway_usage_events_dropped", "Usage events lost on purpose", ["reason"])
SPOOL_BYTES = Gauge("tollway_usage_spool_bytes", "Bytes waiting in the local spool")
FLUSH_SECONDS = Histogram(
    "tollway_usage_flush_seconds",
    "Time to send one flush to Redis",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

APPEND_SCRIPT = (Path(__file__).parent / "usage_append.lua").read_text()
APPEND_SHA = hashlib.sha1(APPEND_SCRIPT.encode(), usedforsecurity=False).hexdigest()
REPLAY_CHUNK_BYTES = 4 * 1024 * 1024
RETRY_AFTER_S = 1.0
_REDIS_DOWN = (RedisError, OSError)


def producers_key(shard: int) -> str:
    return f"{stream_key(shard)}:producers"


class UsageEmitter:
    def __init__(
        self,
        client: aioredis.Redis,
        spool: Spool,
        *,
        shards: int,
        flush_ms: int,
        batch: int,
        max_pending: int | None = None,
    ) -> None:
        self._redis = client
        self._spool = spool
        self._shards = shards
        self._flush_s = flush_ms / 1000
        self._batch = batch
        self._max_pending = max_pending or 10 * batch
        self._pending: list[UsageEvent] = []
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._producer = uuid.uuid4().bytes
        self._seq = 0
        self._retry_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        SPOOL_BYTES.set(spool.size)

    @classmethod
    def from_settings(cls, settings: Settings) -> UsageEmitter:
        client = aioredis.Redis.from_url(
            redis_url(settings), socket_timeout=1.0, socket_connect_timeout=1.0
        )
        spool = Spool.open(settings.data_dir / "spool", settings.spool_max_bytes)
        return cls(
            client,
            spool,
            shards=settings.usage_shards,
            flush_ms=settings.usage_flush_ms,
            batch=settings.usage_batch,
        )

    def emit(self, event: UsageEvent) -> None:
        pending = self._pending
        if len(pending) >= self._max_pending:
            DROPPED.labels("buffer_full").inc()
            return
        pending.append(event)
        if len(pending) == self._batch:
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-emitter")

    async def aclose(self) -> None:
        """Stop the flusher and send (or spool) everything still in memory."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        self._retry_at = 0.0
        await self.flush()
        self._spool.close()
        await self._redis.aclose()

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_s)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("usage flush failed")

    async def flush(self) -> None:
        """Send what is pending; one flush at a time, so each shard sees rising sequence numbers."""
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        events, self._pending = self._pending, []
        batches = self._batches(events)
        if self._spool.size and not await self._replay():
            await self._to_spool(batches)
            return
        if not batches:
            return
        if time.monotonic() < self._retry_at:
            await self._to_spool(batches)
            return
        try:
            await self._send(batches)
        except _REDIS_DOWN as exc:
            log.warning("redis unavailable, spooling usage events: %s", exc)
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            await self._to_spool(batches)

    def _batches(self, events: list[UsageEvent]) -> list[SpooledBatch]:
        if not events:
            return []
        EMITTED.inc(len(events))
        by_shard: dict[int, list[bytes]] = {}
        shards = self._shards
        for event in events:
            by_shard.setdefault(shard_for(event.tenant_id, shards), []).append(event.to_bytes())
        batches = []
        for shard, payloads in by_shard.items():
            self._seq += 1
            batches.append(SpooledBatch(self._producer, self._seq, shard, payloads))
        return batches

    async def _send(self, batches: list[SpooledBatch]) -> None:
        """One pipelined round trip of EVALSHA; the script is loaded only when Redis lacks it."""
        started = time.perf_counter()
        for attempt in (1, 2):
            pipe = self._redis.pipeline(transaction=False)
            for b in batches:
                shard = b.shard % self._shards
                pipe.evalsha(
                    APPEND_SHA,
                    2,
                    stream_key(shard),
                    producers_key(shard),
                    b.producer.hex(),
                    b.seq,
                    *b.payloads,
                )
            try:
                await pipe.execute()
                break
            except NoScriptError:
                if attempt == 2:
                    raise
                await self._redis.script_load(APPEND_SCRIPT)
        FLUSH_SECONDS.observe(time.perf_counter() - started)
        FLUSHED.inc(sum(len(b.payloads) for b in batches))

    async def _to_spool(self, batches: list[SpooledBatch]) -> None:
        if not batches:
            return
        refused = await asyncio.to_thread(self._spool.append, batches)
        SPOOLED.inc(sum(len(b.payloads) for b in batches) - refused)
        if refused:
            DROPPED.labels("spool_full").inc(refused)
            log.error("usage spool full, dropped %d events", refused)
        SPOOL_BYTES.set(self._spool.size)

    async def _replay(self) -> bool:
        """Send the spool in order and empty it; False (spool kept) if Redis still fails."""
        if time.monotonic() < self._retry_at:
            return False
        offset = 0
        while offset < self._spool.size:
            batches, after = await asyncio.to_thread(self._spool.read, offset, REPLAY_CHUNK_BYTES)
            try:
                await self._send(batches)
            except _REDIS_DOWN as exc:
                log.warning("redis unavailable, spool replay paused: %s", exc)
                self._retry_at = time.monotonic() + RETRY_AFTER_S
                return False
            offset = after
        await asyncio.to_thread(self._spool.clear)
        SPOOL_BYTES.set(0)
        log.info("usage spool replayed (%d bytes)", offset)
        return True
