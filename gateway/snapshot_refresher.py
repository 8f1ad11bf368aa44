"""Keeps each gateway process's snapshot current without putting the store on the hot path.

Requests read `refresher.snapshot`, one attribute. A background loop replaces it:

- at once when a change notification arrives on the Redis channel (the control plane
  publishes after commit), and
- whenever the periodic check (`snapshot.changed`) finds an audit event the snapshot has not
  seen, which catches a notification lost to a Redis blip or published while unsubscribed.

Reloads are incremental (only the tenants the new events name), with a full load every
FULL_RELOAD_S as a backstop. One loop does every reload, so a burst of notifications collapses
into at most one reload in progress plus one queued. Loads run in a worker thread because
they are blocking I/O. When
Redis or the store is down the last snapshot keeps serving; `age()` says how long it has been
since the snapshot was last known to be current, for metrics and health checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import orjson
import redis
import redis.asyncio as aioredis
from prometheus_client import Gauge
from sqlalchemy import Engine

from gateway.snapshot import Snapshot, changed, load_snapshot, refresh_snapshot
from tenancy.settings import Settings

log = logging.getLogger("tollway.snapshot")

RESUBSCRIBE_MAX_S = 5.0
FULL_RELOAD_S = 60.0  # a full load now and then repairs anything an incremental one missed

snapshot_age = Gauge(
    "tollway_snapshot_age_seconds",
    "Seconds since this process's control-plane snapshot was last confirmed current",
)


class SnapshotRefresher:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        redis_url: str | None = None,
        on_swap: Callable[[Snapshot], None] | None = None,
    ) -> None:
        self._engine = engine
        self._check_s = settings.snapshot_check_s
        self._channel = settings.change_channel
        self._redis_url = redis_url
        self._on_swap = on_swap
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._confirmed = -float("inf")
        self._full_at = -float("inf")
        self._failing = False
        self.snapshot: Snapshot
        self.reloads = 0

    async def start(self) -> None:
        """Load the first snapshot (a failure here propagates: nothing to serve yet)."""
        started = time.monotonic()
        self.snapshot = await asyncio.to_thread(load_snapshot, self._engine)
        self._confirmed = self._full_at = started
        snapshot_age.set_function(self.age)
        self._tasks.append(asyncio.create_task(self._run(), name="snapshot-refresh"))
        if self._redis_url is not None:
            self._tasks.append(asyncio.create_task(self._listen(), name="snapshot-listen"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def age(self) -> float:
        return time.monotonic() - self._confirmed

    def notify(self, seq: int | None = None) -> None:
        """Ask for a reload, unless the snapshot already reflects audit sequence `seq`."""
        if seq is None or seq not in self.snapshot.seen:
            self._dirty.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self._check_s)
            started = time.monotonic()
            full = started - self._full_at >= FULL_RELOAD_S
            try:
                asked = self._dirty.is_set() or full
                if not asked and not await asyncio.to_thread(self._changed):
                    self._confirmed = started
                    self._recovered()
                    continue
                self._dirty.clear()
                snapshot = await asyncio.to_thread(self._load, full)
                if full:
                    self._full_at = started
            except Exception as exc:  # the loop must outlive any store failure
                if not self._failing:
                    log.warning("snapshot refresh failing, serving version %d: %s",
                                self.snapshot.version, exc)
                self._failing = True
                continue
            self._confirmed = started
            self._recovered()
            self.reloads += 1
            self.snapshot = snapshot
            if self._on_swap is not None:
                try:
                    self._on_swap(snapshot)
                except Exception:  # a listener's bug must not stop the refreshes
                    log.exception("snapshot on_swap callback failed")

    def _load(self, full: bool) -> Snapshot:
        if full:
            return load_snapshot(self._engine)
        return refresh_snapshot(self._engine, self.snapshot)

    def _changed(self) -> bool:
        with self._engine.connect() as conn:
            return changed(conn, self.snapshot)

    def _recovered(self) -> None:
        if self._failing:
            log.warning("snapshot refresh recovered at version %d", self.snapshot.version)
            self._failing = False

    async def _listen(self) -> None:
        assert self._redis_url is not None
        client = aioredis.Redis.from_url(self._redis_url)
        backoff = 0.1
        subscribed_before = False
        try:
            while True:
                pubsub = client.pubsub()
                try:
                    await pubsub.subscribe(self._channel)
                    if subscribed_before:  # changes published while we were away
                        self.notify()
                    subscribed_before, backoff = True, 0.1
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self.notify(_seq(message["data"]))
                except (redis.RedisError, OSError) as exc:
                    log.warning("change channel unavailable, retrying in %.1fs: %s", backoff, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RESUBSCRIBE_MAX_S)
                finally:
                    with contextlib.suppress(redis.RedisError, OSError):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()


def _seq(data: bytes) -> int | None:
    try:
        seq = orjson.loads(data).get("seq")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return seq if isinstance(seq, int) else None
