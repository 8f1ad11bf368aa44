"""Shared fixtures. Every test gets its own stores: a SQLite file or a fresh PostgreSQL
database, its own Redis database number per xdist worker (flushed per test) and its own
change channel, and its own chDB directory."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cli_harness import Cli
from sqlalchemy import create_engine, text

from tenancy.controlplane import ControlPlane
from tenancy.settings import Settings, load_settings
from tenancy.store import migrate, open_engine

PG_ADMIN_URL = os.environ.get("TOLLWAY_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("TOLLWAY_TEST_REDIS", "redis://127.0.0.1:6379")


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker.startswith("gw") else 0


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database owned by this xdist worker, empty at the start of each test."""
    url = f"{REDIS_BASE}/{1 + _worker_index() % 15}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database, dropped after the test."""
    name = f"tw_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'control.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def settings(tmp_path: Path, database_url: str, redis_url: str) -> Settings:
    return load_settings(
        env={},
        data_dir=tmp_path / "data",
        database_url=database_url,
        redis_url=redis_url,
        clickhouse_url=f"chdb://{tmp_path / 'chdb'}",
        change_channel=f"tollway:changes:{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture
def cp(settings: Settings) -> Iterator[ControlPlane]:
    """A migrated control plane on both store backends."""
    _migrate(settings.effective_database_url)
    plane = ControlPlane.open(settings)
    yield plane
    plane.close()


@pytest.fixture
def sqlite_cp(tmp_path: Path, redis_url: str) -> Iterator[ControlPlane]:
    """A migrated control plane on SQLite only, for tests that are not about the store."""
    settings = load_settings(
        env={},
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'control.db'}",
        redis_url=redis_url,
        clickhouse_url=f"chdb://{tmp_path / 'chdb'}",
        change_channel=f"tollway:changes:{uuid.uuid4().hex[:8]}",
    )
    _migrate(settings.effective_database_url)
    plane = ControlPlane.open(settings)
    yield plane
    plane.close()


# chDB: one engine path per process. A test's client is closed at teardown, which lets the
# next test in the same xdist worker open its own tmp directory (checked on chDB 4.4: opening
# a second path while a client is open fails; after close() it works). Use these fixtures (or
# metering.clickhouse.connect/close) rather than holding a chDB client across tests.
@pytest.fixture
def ch_settings(tmp_path: Path, redis_url: str) -> Settings:
    """Settings on SQLite + this worker's Redis + a private chDB directory."""
    return load_settings(
        env={},
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'control.db'}",
        redis_url=redis_url,
        clickhouse_url=f"chdb://{tmp_path / 'chdb'}",
        change_channel=f"tollway:changes:{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture
def ch(ch_settings: Settings) -> Iterator[object]:
    """A migrated ClickHouse client (chDB) for `ch_settings`, closed after the test."""
    from metering import clickhouse
    from metering.migrations import migrate as migrate_clickhouse

    client = clickhouse.connect(ch_settings)
    migrate_clickhouse(client, ch_settings)
    yield client
    clickhouse.close()


def _migrate(url: str) -> None:
    engine = open_engine(url)
    migrate(engine)
    engine.dispose()


@pytest.fixture
def cli(tmp_path: Path, redis_url: str) -> Iterator[Cli]:
    """The CLI on this test's SQLite file, Redis database, chDB directory and change channel."""
    from metering import clickhouse

    env: dict[str, str | None] = {
        "TOLLWAY_CONFIG": None,
        "COLUMNS": "200",
        "TOLLWAY_DATA_DIR": str(tmp_path / "data"),
        "TOLLWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'control.db'}",
        "TOLLWAY_REDIS_URL": redis_url,
        "TOLLWAY_CLICKHOUSE_URL": f"chdb://{tmp_path / 'chdb'}",
        "TOLLWAY_CHANGE_CHANNEL": f"tollway:changes:{uuid.uuid4().hex[:8]}",
    }
    yield Cli(tmp_path, env)
    clickhouse.close()
