"""The in-process snapshot and its refresher, on the real stores (SQLite, PostgreSQL, Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.engine import make_url

from gateway.snapshot import (
    MISCONFIGURED_SCOPE,
    RouteRule,
    Snapshot,
    load_snapshot,
    refresh_snapshot,
)
from gateway.snapshot_refresher import SnapshotRefresher
from tenancy import audit, keys, plans, tenants
from tenancy.controlplane import ControlPlane
from tenancy.keys import hash_secret
from tenancy.settings import load_settings
from tenancy.store import migrate, open_engine
from tenancy.tables import audit_events
from tenancy.tables import tenants as tenants_table


def onboard(cp: ControlPlane, name: str, **kw: Any) -> str:
    plans.ensure_defaults(cp)
    return str(tenants.create(cp, actor="test", name=name, email="ops@example.com", **kw)["id"])


def set_tenant_settings(cp: ControlPlane, tenant_id: str, doc: dict[str, Any]) -> None:
    """Gateway-facing tenant settings (jwks, routes, dunning) written as the control plane
    writes: the row and its audit event in one transaction."""
    with cp.transaction("test") as tx:
        tx.conn.execute(
            update(tenants_table).where(tenants_table.c.id == tenant_id).values(settings=doc)
        )
        tx.audit("tenant.settings_changed", tenant_id, tenant_id=tenant_id, after=doc)


async def eventually(check: Callable[[], bool], within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not true within {within}s"
        await asyncio.sleep(0.01)


def test_load_builds_lookup_maps_on_both_backends(cp: ControlPlane) -> None:
    acme = onboard(
        cp, "Acme", subdomain="Acme", domains=["API.Acme.example"], timezone="Europe/Paris"
    )
    other = onboard(cp, "Other")
    set_tenant_settings(cp, acme, {
        "routes": [{"prefix": "/admin/", "scopes": ["admin:write", "admin:read"]}],
        "dunning_days": 3,
    })
    _, live = keys.create(cp, acme, actor="test", scopes=["orders:read"])
    revoked, dead = keys.create(cp, other, actor="test")
    keys.revoke(cp, revoked["id"], actor="test")

    snap = load_snapshot(cp.engine)

    with cp.engine.connect() as conn:
        assert snap.version == conn.execute(select(func.max(audit_events.c.seq))).scalar_one()
    record = snap.tenants[acme]
    assert snap.by_subdomain["acme"] is record
    assert snap.by_domain["api.acme.example"] is record
    assert record.tz.key == "Europe/Paris"
    assert record.plan is not None and record.plan.plan_id == "starter"
    assert record.plan is snap.plans[record.plan.plan_id, record.plan.version]
    assert record.status == "trial" and record.trial_ends_ts is not None
    assert record.trial_ends_ts > time.time()
    assert record.dunning_days == 3
    assert [(r.prefix, r.scopes) for r in record.routes] == [
        ("/admin", ("admin:read", "admin:write"))
    ]
    assert snap.tenants[other].dunning_days == 7
    assert snap.keys[hash_secret(live)].tenant_id == acme
    assert snap.keys[hash_secret(live)].scopes == frozenset({"orders:read"})
    assert hash_secret(dead) not in snap.keys


def test_one_tenants_bad_settings_do_not_break_the_load(sqlite_cp: ControlPlane) -> None:
    bad = onboard(sqlite_cp, "Bad")
    good = onboard(sqlite_cp, "Good")
    set_tenant_settings(sqlite_cp, bad, {
        "routes": [{"prefix": "admin"}, "junk", {"prefix": "/ops", "scopes": "ops:write"}],
        "dunning_days": "soon",
        "jwks": {"keys": "nope"},
    })
    with sqlite_cp.transaction("test") as tx:
        tx.conn.execute(
            update(tenants_table).where(tenants_table.c.id == bad).values(timezone="Mars/Olympus")
        )
    snap = load_snapshot(sqlite_cp.engine)
    record = snap.tenants[bad]
    assert record.routes == (RouteRule("/ops", (MISCONFIGURED_SCOPE,)),)
    assert record.dunning_days == 7 and record.jwks is None
    assert record.tz.key == "UTC"
    assert good in snap.tenants


def content(snap: Snapshot) -> tuple[Any, ...]:
    return (
        dict(snap.tenants), {k: t.id for k, t in snap.by_subdomain.items()},
        {k: t.id for k, t in snap.by_domain.items()}, dict(snap.keys), dict(snap.plans),
        snap.version, snap.seen,
    )


def test_incremental_refresh_equals_a_full_load(cp: ControlPlane) -> None:
    acme = onboard(cp, "Acme", subdomain="acme")
    beta = onboard(cp, "Beta", domains=["api.beta.example"])
    _, kept = keys.create(cp, beta, actor="test")
    doomed, gone = keys.create(cp, beta, actor="test")
    quiet = onboard(cp, "Quiet")
    old = load_snapshot(cp.engine)

    gamma = onboard(cp, "Gamma", subdomain="gamma", domains=["api.gamma.example"])
    _, fresh = keys.create(cp, acme, actor="test", scopes=["orders:read"])
    keys.revoke(cp, doomed["id"], actor="test")
    tenants.transition(cp, acme, "suspend", actor="test")
    set_tenant_settings(cp, beta, {"routes": [{"prefix": "/admin", "scopes": ["admin:write"]}]})

    patched = refresh_snapshot(cp.engine, old)
    assert content(patched) == content(load_snapshot(cp.engine))
    assert patched.tenants[acme].status == "suspended"
    assert patched.by_subdomain["gamma"].id == gamma
    assert hash_secret(fresh) in patched.keys and hash_secret(kept) in patched.keys
    assert hash_secret(gone) not in patched.keys
    # An untouched tenant keeps its record: the incremental load did no work for it.
    assert patched.tenants[quiet] is old.tenants[quiet]
    assert patched.tenants[beta] is not old.tenants[beta]


def test_a_new_plan_version_forces_a_full_load(sqlite_cp: ControlPlane) -> None:
    onboard(sqlite_cp, "Acme")
    old = load_snapshot(sqlite_cp.engine)
    doc = plans.load_document(plans.DEFAULTS_FILE)
    plans.apply(sqlite_cp, {"plans": {"starter": {**doc["plans"]["starter"], "price": "31.00"}}},
                "test")
    patched = refresh_snapshot(sqlite_cp.engine, old)
    assert len(patched.plans) == len(old.plans) + 1
    assert content(patched) == content(load_snapshot(sqlite_cp.engine))


async def test_two_replicas_see_revocation_and_suspension_within_a_second(
    cp: ControlPlane,
) -> None:
    acme = onboard(cp, "Acme")
    created, secret = keys.create(cp, acme, actor="test")
    settings = cp.settings
    url = settings.effective_database_url
    engines = [open_engine(url) for _ in range(2)]
    replicas = [SnapshotRefresher(e, settings, settings.redis_url) for e in engines]
    for replica in replicas:
        await replica.start()
    try:
        assert all(hash_secret(secret) in r.snapshot.keys for r in replicas)
        await asyncio.to_thread(keys.revoke, cp, created["id"], actor="test")
        await eventually(lambda: all(hash_secret(secret) not in r.snapshot.keys for r in replicas))

        await asyncio.to_thread(tenants.transition, cp, acme, "suspend", actor="test")
        await eventually(
            lambda: all(r.snapshot.tenants[acme].status == "suspended" for r in replicas)
        )
        assert all(r.age() < 1.0 for r in replicas)
    finally:
        for replica, engine in zip(replicas, engines, strict=True):
            await replica.close()
            engine.dispose()


async def test_version_check_catches_changes_without_notifications(
    sqlite_cp: ControlPlane,
) -> None:
    acme = onboard(sqlite_cp, "Acme")
    _, secret = keys.create(sqlite_cp, acme, actor="test")
    # No Redis at all for the replica, and the writer publishes nowhere it listens.
    refresher = SnapshotRefresher(sqlite_cp.engine, sqlite_cp.settings, redis_url=None)
    await refresher.start()
    try:
        key_id = refresher.snapshot.keys[hash_secret(secret)].id
        await asyncio.to_thread(keys.revoke, sqlite_cp, key_id, actor="test")
        await eventually(lambda: hash_secret(secret) not in refresher.snapshot.keys)
    finally:
        await refresher.close()


async def test_redis_outage_falls_back_to_version_check(sqlite_cp: ControlPlane) -> None:
    acme = onboard(sqlite_cp, "Acme")
    _, secret = keys.create(sqlite_cp, acme, actor="test")
    # Nothing listens on port 1 of loopback: the subscriber keeps failing and retrying.
    refresher = SnapshotRefresher(sqlite_cp.engine, sqlite_cp.settings, "redis://127.0.0.1:1/0")
    await refresher.start()
    try:
        key_id = refresher.snapshot.keys[hash_secret(secret)].id
        await asyncio.to_thread(keys.revoke, sqlite_cp, key_id, actor="test")
        await eventually(lambda: hash_secret(secret) not in refresher.snapshot.keys)
    finally:
        await refresher.close()


async def test_a_failing_swap_listener_does_not_stop_refreshes(sqlite_cp: ControlPlane) -> None:
    acme = onboard(sqlite_cp, "Acme")
    swapped: list[int] = []

    def listener(snapshot: Snapshot) -> None:
        swapped.append(snapshot.version)
        raise RuntimeError("a listener bug")

    refresher = SnapshotRefresher(sqlite_cp.engine, sqlite_cp.settings, on_swap=listener)
    await refresher.start()
    try:
        for _ in range(2):
            _, secret = await asyncio.to_thread(keys.create, sqlite_cp, acme, actor="test")
            digest = hash_secret(secret)
            await eventually(lambda d=digest: d in refresher.snapshot.keys)  # type: ignore[misc]
        assert len(swapped) >= 2 and swapped == sorted(swapped)
    finally:
        await refresher.close()


async def test_a_burst_of_notifications_is_one_reload(sqlite_cp: ControlPlane) -> None:
    onboard(sqlite_cp, "Acme")
    refresher = SnapshotRefresher(sqlite_cp.engine, sqlite_cp.settings)
    await refresher.start()
    try:
        version = refresher.snapshot.version
        for _ in range(50):
            refresher.notify(version + 1)
        refresher.notify(version)  # already reflected: no reload asked
        await eventually(lambda: refresher.reloads >= 1)
        await asyncio.sleep(0.1)
        assert refresher.reloads == 1
    finally:
        await refresher.close()


@pytest.fixture
def pg_cp(pg_url: str) -> Iterator[ControlPlane]:
    """A PostgreSQL control plane that publishes nothing: only the version check can help."""
    settings = load_settings(env={}, database_url=pg_url, snapshot_check_s=0.05)
    migrate(open_engine(pg_url))
    plane = ControlPlane.open(settings, with_redis=False)
    yield plane
    plane.close()


async def test_a_transaction_committing_below_the_newest_seq_is_noticed(
    pg_cp: ControlPlane,
) -> None:
    acme = onboard(pg_cp, "Acme")
    other = onboard(pg_cp, "Other")
    refresher = SnapshotRefresher(pg_cp.engine, pg_cp.settings)
    await refresher.start()
    slow = pg_cp.engine.connect()
    try:
        late = slow.begin()  # takes its audit seq now, commits after a later writer
        event = audit.record(slow, actor="test", type="tenant.suspended", subject=acme,
                             tenant_id=acme)
        slow.execute(
            update(tenants_table).where(tenants_table.c.id == acme).values(status="suspended")
        )
        _, secret = await asyncio.to_thread(keys.create, pg_cp, other, actor="test")
        await eventually(lambda: hash_secret(secret) in refresher.snapshot.keys)
        assert refresher.snapshot.version > event["seq"]
        late.commit()
        await eventually(lambda: refresher.snapshot.tenants[acme].status == "suspended")
    finally:
        slow.close()
        await refresher.close()


async def test_store_outage_keeps_serving_the_last_snapshot(
    pg_url: str, pg_cp: ControlPlane
) -> None:
    cp, settings = pg_cp, pg_cp.settings
    engine = open_engine(pg_url)
    refresher = SnapshotRefresher(engine, settings)
    database = make_url(pg_url).database
    admin = create_engine(pg_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    try:
        acme = onboard(cp, "Acme")
        await refresher.start()
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": database},
            )
        await asyncio.sleep(0.5)
        assert refresher.snapshot.tenants[acme].status == "trial"
        assert refresher.age() >= 0.3
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        await asyncio.to_thread(tenants.transition, cp, acme, "suspend", actor="test")
        await eventually(lambda: refresher.snapshot.tenants[acme].status == "suspended", 3.0)
        assert refresher.age() < 1.0
    finally:
        await refresher.close()
        engine.dispose()
        admin.dispose()


async def test_a_garbled_notification_still_triggers_a_reload(
    sqlite_cp: ControlPlane, redis_client: Any
) -> None:
    onboard(sqlite_cp, "Acme")
    settings = sqlite_cp.settings
    refresher = SnapshotRefresher(sqlite_cp.engine, settings, settings.redis_url)
    await refresher.start()
    try:
        await eventually(lambda: redis_client.pubsub_numsub(settings.change_channel)[0][1] == 1)
        redis_client.publish(settings.change_channel, b"not json")
        await eventually(lambda: refresher.reloads == 1)
    finally:
        await refresher.close()
