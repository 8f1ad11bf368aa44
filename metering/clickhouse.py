"""One ClickHouse client per process and purpose, chDB embedded or a server, via clickhouse-connect.

chDB lets a process open a single data directory at a time and its calls block, so clients
are cached here and reused; async callers go through `run_blocking`, which also serialises
calls because one chDB handle is not safe to share between threads. Opening a different
chDB directory closes the cached clients first, which is what lets each test own a directory.

The read-only client is a separate handle because on chDB a query-level `readonly=1` sticks
to the session: a single read-only query would turn the shared writer read-only for good.
Its limits are set before `readonly`, since a read-only session can no longer change settings.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from tenancy.settings import Settings

T = TypeVar("T")

# Inserts that repeat a block with the same insert_deduplication_token must not reach the
# rollups twice: the raw table drops the block and the materialized views must drop it too.
SESSION_SETTINGS: dict[str, object] = {"deduplicate_blocks_in_dependent_materialized_views": 1}
READONLY_SETTINGS: dict[str, object] = {
    "max_result_rows": 100_000,
    "result_overflow_mode": "throw",
    "max_execution_time": 30,
    "readonly": 1,
}

_lock = threading.Lock()
_calls = threading.Lock()
_dsn: str | None = None
_clients: dict[str, Client] = {}


def clickhouse_dsn(settings: Settings) -> str:
    if settings.clickhouse_url:
        return settings.clickhouse_url
    return f"chdb://{(settings.data_dir / 'chdb').resolve()}"


def is_chdb(settings: Settings) -> bool:
    return clickhouse_dsn(settings).startswith("chdb:")


def connect(settings: Settings) -> Client:
    """The process's read-write client for `settings`; reopened only when the target changes."""
    return _client(settings, "rw", SESSION_SETTINGS)


def readonly_client(settings: Settings) -> Client:
    """A separate session that ClickHouse itself keeps read-only, with result limits."""
    return _client(settings, "ro", READONLY_SETTINGS)


def close() -> None:
    global _dsn
    with _lock:
        for client in _clients.values():
            client.close()
        _clients.clear()
        _dsn = None


def _client(settings: Settings, kind: str, session: dict[str, object]) -> Client:
    global _dsn
    dsn = clickhouse_dsn(settings)
    with _lock:
        if _dsn != dsn:
            for client in _clients.values():
                client.close()
            _clients.clear()
            _dsn = dsn
        if kind not in _clients:
            if dsn.startswith("chdb:"):
                Path(urlsplit(dsn).path).mkdir(parents=True, exist_ok=True)
            _clients[kind] = clickhouse_connect.get_client(dsn=dsn, settings=dict(session))
        return _clients[kind]


async def run_blocking(fn: Callable[..., T], *args: object) -> T:
    """Run a ClickHouse call off the event loop, one at a time per process."""

    def locked() -> T:
        with _calls:
            return fn(*args)

    return await asyncio.to_thread(locked)
