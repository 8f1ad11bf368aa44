"""When each API key was last used, recorded without the store on the request path.

The gateway calls `touch` per request: one dict assignment, so a thousand requests on one key
between flushes cost one row update. A background task writes the pending timestamps in one
executemany and the SQL only ever moves `last_used_at` forward, so replicas flushing out of
order, or the same batch written twice, cannot move it back. The value is thus accurate to
the flush interval, and a crash loses at most one interval of it.

`touch`, and the taking and restoring of the pending batch, run on the event loop thread;
only the blocking write goes to a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import Engine, bindparam, update
from sqlalchemy.exc import SQLAlchemyError

from tenancy.tables import api_keys

log = logging.getLogger("tollway.key_usage")

_ADVANCE = (
    update(api_keys)
    .where(
        api_keys.c.id == bindparam("key_id"),
        api_keys.c.last_used_at.is_(None)
        | (api_keys.c.last_used_at < bindparam("used_at", type_=api_keys.c.last_used_at.type)),
    )
    .values(last_used_at=bindparam("used_at", type_=api_keys.c.last_used_at.type))
)


def write(engine: Engine, batch: dict[str, float]) -> None:
    """One executemany for the whole batch; never moves a timestamp back."""
    if not batch:
        return
    params = [
        {"key_id": key_id, "used_at": datetime.fromtimestamp(at, UTC)}
        for key_id, at in batch.items()
    ]
    with engine.begin() as conn:
        conn.execute(_ADVANCE, params)


class LastUsed:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._pending: dict[str, float] = {}
        self._in_flight: dict[str, float] = {}

    def touch(self, key_id: str) -> None:
        self._pending[key_id] = self._clock()

    def pending(self) -> int:
        """Keys whose last use is not in the store yet, a batch being written included."""
        if not self._in_flight:
            return len(self._pending)
        return len(self._pending.keys() | self._in_flight.keys())

    def _take(self) -> dict[str, float]:
        batch, self._pending = self._pending, {}
        self._in_flight = batch
        return batch

    def _restore(self, batch: dict[str, float]) -> None:
        """Put back a batch that may not have been written; newer touches win."""
        for key_id, at in batch.items():
            if self._pending.get(key_id, at) <= at:
                self._pending[key_id] = at

    def flush(self, engine: Engine) -> int:
        """Write everything pending now; returns how many keys were written."""
        batch = self._take()
        try:
            write(engine, batch)
        except BaseException:
            self._restore(batch)
            raise
        finally:
            self._in_flight = {}
        return len(batch)

    async def flush_async(self, engine: Engine) -> int:
        batch = self._take()
        try:
            await asyncio.to_thread(write, engine, batch)
        except BaseException:
            # on cancellation the thread may still finish; writing twice is harmless
            self._restore(batch)
            raise
        finally:
            self._in_flight = {}
        return len(batch)

    async def run(self, engine: Engine, interval_s: float) -> None:
        """Flush every `interval_s` until cancelled, then flush what is left. A store outage
        only delays the write: the batch stays pending and is retried next interval."""
        try:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await self.flush_async(engine)
                except SQLAlchemyError as exc:
                    log.warning("last-used flush failed, will retry: %s", exc)
        except asyncio.CancelledError:
            try:
                await self.flush_async(engine)
            except SQLAlchemyError as exc:
                log.error("last-used flush at shutdown failed, %d keys lost: %s",
                          self.pending(), exc)
            raise
