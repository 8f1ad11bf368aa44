"""The control plane's handle: settings, the store engine and the change channel.

`transaction()` is the one way services write. It commits the rows and their audit events
together, and only after commit publishes the events, so a replica never refreshes onto
state that was rolled back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy import Connection, Engine

from tenancy import audit, hotstate
from tenancy.settings import Settings
from tenancy.store import open_engine

log = logging.getLogger("tollway.controlplane")


@dataclass
class Tx:
    conn: Connection
    actor: str
    events: list[dict[str, Any]] = field(default_factory=list)

    def audit(self, type: str, subject: str, **kw: Any) -> dict[str, Any]:
        event = audit.record(self.conn, actor=self.actor, type=type, subject=subject, **kw)
        self.events.append(event)
        return event


@dataclass
class ControlPlane:
    settings: Settings
    engine: Engine
    redis: redis.Redis | None = None

    @classmethod
    def open(cls, settings: Settings, *, with_redis: bool = True) -> ControlPlane:
        engine = open_engine(settings.effective_database_url)
        client = hotstate.connect(settings) if with_redis else None
        return cls(settings=settings, engine=engine, redis=client)

    @contextmanager
    def transaction(self, actor: str) -> Iterator[Tx]:
        with self.engine.begin() as conn:
            tx = Tx(conn=conn, actor=actor)
            yield tx
        self._publish(tx.events)

    def _publish(self, events: list[dict[str, Any]]) -> None:
        if not events or self.redis is None:
            return
        try:
            audit.publish(self.redis, self.settings.change_channel, events)
        except redis.RedisError as exc:
            log.warning("change notification not published: %s", exc)

    def close(self) -> None:
        self.engine.dispose()
        if self.redis is not None:
            self.redis.close()
