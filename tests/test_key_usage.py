from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.exc import OperationalError

from tenancy import key_usage, keys, plans, tenants
from tenancy.controlplane import ControlPlane
from tenancy.key_usage import LastUsed
from tenancy.store import open_engine
from tenancy.tables import api_keys

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC).timestamp()


class Clock:
    """A settable wall clock, so the stored timestamps are known exactly."""

    def __init__(self, at: float = T0) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def make_keys(cp: ControlPlane, n: int) -> list[str]:
    plans.ensure_defaults(cp)
    tenant = tenants.create(cp, actor="test", name="Acme", email="ops@acme.example.com")
    return [keys.create(cp, tenant["id"], actor="test")[0]["id"] for _ in range(n)]


def last_used(engine: Engine, key_id: str) -> datetime | None:
    with engine.connect() as conn:
        value = conn.execute(
            select(api_keys.c.last_used_at).where(api_keys.c.id == key_id)
        ).scalar_one()
    return keys.aware(value)


@pytest.fixture
def updates(cp: ControlPlane) -> Iterator[list[tuple[bool, int]]]:
    """(executemany, parameter sets) of every UPDATE on api_keys the store really runs."""
    seen: list[tuple[bool, int]] = []

    def record(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, many: bool) -> None:
        if statement.startswith("UPDATE api_keys"):
            seen.append((many, len(params) if many else 1))

    event.listen(cp.engine, "before_cursor_execute", record)
    yield seen
    event.remove(cp.engine, "before_cursor_execute", record)


def when(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def test_many_touches_of_one_key_are_one_write(
    cp: ControlPlane, updates: list[tuple[bool, int]]
) -> None:
    (key_id,) = make_keys(cp, 1)
    clock = Clock()
    recorder = LastUsed(clock)
    for i in range(1000):
        clock.at = T0 + i / 1000
        recorder.touch(key_id)
    assert recorder.pending() == 1
    assert recorder.flush(cp.engine) == 1
    assert updates == [(False, 1)]
    assert last_used(cp.engine, key_id) == when(T0 + 0.999)
    assert recorder.pending() == 0
    assert recorder.flush(cp.engine) == 0
    assert len(updates) == 1


def test_many_keys_are_one_batched_statement(
    cp: ControlPlane, updates: list[tuple[bool, int]]
) -> None:
    key_ids = make_keys(cp, 5)
    clock = Clock()
    recorder = LastUsed(clock)
    for i, key_id in enumerate(key_ids):
        clock.at = T0 + i
        recorder.touch(key_id)
        recorder.touch(key_id)
    assert recorder.flush(cp.engine) == 5
    assert updates == [(True, 5)]
    for i, key_id in enumerate(key_ids):
        assert last_used(cp.engine, key_id) == when(T0 + i)


def test_last_used_only_moves_forward(cp: ControlPlane) -> None:
    """A replica with a lagging clock, or an old batch written late, cannot move it back."""
    (key_id,) = make_keys(cp, 1)
    ahead, behind = LastUsed(Clock(T0 + 60)), LastUsed(Clock(T0))
    ahead.touch(key_id)
    ahead.flush(cp.engine)
    behind.touch(key_id)
    behind.flush(cp.engine)
    assert last_used(cp.engine, key_id) == when(T0 + 60)
    later = LastUsed(Clock(T0 + 120))
    later.touch(key_id)
    later.flush(cp.engine)
    assert last_used(cp.engine, key_id) == when(T0 + 120)


def test_a_failed_write_keeps_the_batch_and_newer_touches_win(
    sqlite_cp: ControlPlane, tmp_path: Path
) -> None:
    (key_id,) = make_keys(sqlite_cp, 1)
    unmigrated = open_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    clock = Clock()
    recorder = LastUsed(clock)
    recorder.touch(key_id)
    with pytest.raises(OperationalError):
        recorder.flush(unmigrated)
    assert recorder.pending() == 1
    clock.at = T0 + 5
    recorder.touch(key_id)
    recorder._restore({key_id: T0})  # an older batch coming back must not win
    recorder.flush(sqlite_cp.engine)
    assert last_used(sqlite_cp.engine, key_id) == when(T0 + 5)
    unmigrated.dispose()


def test_unknown_keys_are_ignored(sqlite_cp: ControlPlane) -> None:
    """A key deleted between touch and flush is simply not updated."""
    recorder = LastUsed()
    recorder.touch("key_gone")
    assert recorder.flush(sqlite_cp.engine) == 1
    with sqlite_cp.engine.connect() as conn:
        assert conn.execute(select(api_keys)).first() is None


async def test_run_flushes_periodically_and_on_cancellation(cp: ControlPlane) -> None:
    first, second = make_keys(cp, 2)
    clock = Clock()
    recorder = LastUsed(clock)
    task = asyncio.create_task(recorder.run(cp.engine, 0.02))
    recorder.touch(first)
    for _ in range(200):
        await asyncio.sleep(0.01)
        if last_used(cp.engine, first) is not None:
            break
    assert last_used(cp.engine, first) == when(T0)

    # A long interval: only the flush on cancellation can write this one.
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    slow = asyncio.create_task(recorder.run(cp.engine, 3600))
    await asyncio.sleep(0)
    clock.at = T0 + 30
    recorder.touch(second)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert last_used(cp.engine, second) == when(T0 + 30)
    assert recorder.pending() == 0


async def test_run_survives_a_store_outage(sqlite_cp: ControlPlane, tmp_path: Path) -> None:
    (key_id,) = make_keys(sqlite_cp, 1)
    unmigrated = open_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    recorder = LastUsed(Clock())
    recorder.touch(key_id)
    task = asyncio.create_task(recorder.run(unmigrated, 0.01))
    await asyncio.sleep(0.1)
    assert not task.done()
    assert recorder.pending() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert recorder.pending() == 1
    key_usage.write(sqlite_cp.engine, {key_id: T0})
    assert last_used(sqlite_cp.engine, key_id) == when(T0)
    unmigrated.dispose()


def test_touch_is_wall_clock_by_default(sqlite_cp: ControlPlane) -> None:
    (key_id,) = make_keys(sqlite_cp, 1)
    recorder = LastUsed()
    before = datetime.now(UTC)
    recorder.touch(key_id)
    recorder.flush(sqlite_cp.engine)
    stored = last_used(sqlite_cp.engine, key_id)
    assert stored is not None
    assert before - timedelta(seconds=1) <= stored <= datetime.now(UTC)
