"""One ClickHouse client per process, chDB embedded or a server, through clickhouse-connect.

chDB lets a process open a single data directory at a time and its calls block, so the client
is cached here and reused; async callers go through `run_blocking`, which also serialises calls
because one chDB handle is not safe to share between threads. Opening a different chDB
directory closes the cached client first, which is what lets each test own a directory.
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
SESSION_SETTINGS = {"deduplicate_blocks_in_dependent_materialized_views": 1}

_lock = threading.Lock()
_calls = threading.Lock()
_cached: tuple[str, Client] | None = None


def clickhouse_dsn(settings: Settings) -> str:
    if settings.clickhouse_url:
        return settings.clickhouse_url
    return f"chdb://{(settings.data_dir / 'chdb').resolve()}"


def is_chdb(settings: Settings) -> bool:
    return clickhouse_dsn(settings).startswith("chdb:")


def connect(settings: Settings) -> Client:
    """The process's client for `settings`; reopened only when the target changes."""
    global _cached
    dsn = clickhouse_dsn(settings)
    with _lock:
        if _cached is not None and _cached[0] == dsn:
            return _cached[1]
        if _cached is not None:
            _cached[1].close()
            _cached = None
        if dsn.startswith("chdb:"):
            Path(urlsplit(dsn).path).mkdir(parents=True, exist_ok=True)
        client = clickhouse_connect.get_client(dsn=dsn, settings=dict(SESSION_SETTINGS))
        _cached = (dsn, client)
        return client


def close() -> None:
    global _cached
    with _lock:
        if _cached is not None:
            _cached[1].close()
            _cached = None


async def run_blocking(fn: Callable[..., T], *args: object) -> T:
    """Run a ClickHouse call off the event loop, one at a time per process."""

    def locked() -> T:
        with _calls:
            return fn(*args)

    return await asyncio.to_thread(locked)
