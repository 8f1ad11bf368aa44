from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
import redis
from closing import make_tenant
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, Select, func, inspect, literal_column, select, table

from tenancy import admin_tokens, keys
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem
from tenancy.tables import api_keys, audit_events

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def count(engine: Engine, tbl: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(tbl)).scalar_one())


def audit_types(engine: Engine) -> list[str]:
    """The audit trail of credentials, without the tenant and plan events of the set-up."""
    with engine.connect() as conn:
        query = select(audit_events.c.type).order_by(audit_events.c.seq)
        return [t for t in conn.execute(query).scalars() if t.startswith(("key.", "admin_"))]


def dump_store(engine: Engine) -> str:
    """Every row of every table, as text."""
    out = []
    with engine.connect() as conn:
        for name in inspect(engine).get_table_names():
            everything: Select[Any] = select(literal_column("*")).select_from(table(name))
            rows = list(conn.execute(everything))
            out.append(f"{name}: {rows!r}")
    return "\n".join(out)


# the secret format


def test_minted_keys_match_the_documented_grammar() -> None:
    seen = set()
    for mode in keys.MODES:
        for _ in range(200):
            secret = keys.mint(f"tw_{mode}_")
            assert len(secret) == 57
            assert keys.KEY_PATTERN.fullmatch(secret)
            assert keys.looks_valid(secret)
            seen.add(secret)
    assert len(seen) == 400


def test_checksum_rejects_every_one_character_change() -> None:
    secret = keys.mint("tw_live_")
    for i, original in enumerate(secret):
        for replacement in keys.ALPHABET + "_":
            if replacement != original:
                changed = secret[:i] + replacement + secret[i + 1:]
                assert not keys.looks_valid(changed), (i, replacement)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(keys.MODES), st.integers(min_value=3, max_value=55))
def test_checksum_rejects_adjacent_transpositions(mode: str, i: int) -> None:
    secret = keys.mint(f"tw_{mode}_")
    swapped = secret[:i] + secret[i + 1] + secret[i] + secret[i + 2:]
    assert keys.looks_valid(swapped) == (swapped == secret)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_text_is_never_accepted_and_never_raises(text: str) -> None:
    assert not keys.looks_valid(text)
    assert not admin_tokens.looks_valid(text)


def test_malformed_keys_are_rejected_without_lookup() -> None:
    secret = keys.mint("tw_test_")
    flipped_mode = "tw_live_" + secret[8:]
    assert not keys.looks_valid(flipped_mode)  # the checksum covers the prefix
    for bad in (
        "", secret[:-1], secret + "A", secret + "\n", " " + secret, secret.upper(),
        admin_tokens.PREFIX + secret[8:], "tw_prod_" + secret[8:],
        secret[:20] + "é" + secret[21:],
    ):
        assert not keys.looks_valid(bad), bad
    assert not admin_tokens.looks_valid(secret)


def test_hash_secret_is_sha256_hex() -> None:
    assert keys.hash_secret("tw_live_x") == hashlib.sha256(b"tw_live_x").hexdigest()


# create


def test_create_returns_the_secret_once_and_stores_its_hash(cp: ControlPlane) -> None:
    tenant_id = make_tenant(cp)
    record, secret = keys.create(cp, tenant_id, actor="test", name="ci", scopes=["usage:read"])
    assert keys.looks_valid(secret) and secret.startswith("tw_live_")
    assert "hash" not in record and "secret" not in record
    assert record["prefix"] == secret[:12]
    assert record["scopes"] == ["usage:read"] and record["mode"] == "live"
    with cp.engine.connect() as conn:
        row = conn.execute(select(api_keys).where(api_keys.c.id == record["id"])).mappings().one()
        assert row["hash"] == hashlib.sha256(secret.encode()).hexdigest()
        assert keys.get(conn, record["id"]) == record
        assert keys.list_keys(conn, tenant_id) == [record]
        snapshot = keys.active_by_hash(conn)
    assert snapshot[keys.hash_secret(secret)]["id"] == record["id"]
    assert audit_types(cp.engine) == ["key.created"]


def test_mode_defaults_to_the_settings_and_can_be_chosen(cp: ControlPlane) -> None:
    tenant_id = make_tenant(cp)
    record, secret = keys.create(cp, tenant_id, actor="test", mode="test")
    assert record["mode"] == "test" and secret.startswith("tw_test_")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scopes": "usage:read"}, "scopes"),
        ({"scopes": []}, "scopes"),
        ({"scopes": ["Usage:Read"]}, "scopes"),
        ({"scopes": ["usage"]}, "scopes"),
        ({"scopes": ["*", "usage:read"]}, "scopes"),
        ({"scopes": [f"r{i}:read" for i in range(keys.MAX_SCOPES + 1)]}, "scopes"),
        ({"scopes": [7]}, "scopes"),
        ({"mode": "prod"}, "mode"),
        ({"name": "  "}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "tab\there"}, "name"),
        ({"expires_at": T0 - timedelta(seconds=1)}, "expires_at"),
        ({"expires_at": datetime(2031, 1, 1)}, "expires_at"),
    ],
)
def test_bad_input_is_422_and_writes_nothing(
    sqlite_cp: ControlPlane, kwargs: dict[str, Any], field: str
) -> None:
    tenant_id = make_tenant(sqlite_cp)
    with pytest.raises(Problem) as err:
        keys.create(sqlite_cp, tenant_id, actor="test", now=T0, **kwargs)
    assert err.value.status == 422
    assert err.value.extra["errors"][0]["field"] == field
    assert count(sqlite_cp.engine, api_keys) == 0
    assert audit_types(sqlite_cp.engine) == []


def test_scopes_accept_resource_actions_and_drop_duplicates(sqlite_cp: ControlPlane) -> None:
    tenant_id = make_tenant(sqlite_cp)
    record, _ = keys.create(
        sqlite_cp, tenant_id, actor="test",
        scopes=("usage:read", "events:write", "usage:read", "invoices:*"),
    )
    assert record["scopes"] == ["usage:read", "events:write", "invoices:*"]


def test_unknown_tenant_is_404_and_closed_tenant_is_409(cp: ControlPlane) -> None:
    with pytest.raises(Problem) as err:
        keys.create(cp, "nobody-000000", actor="test")
    assert err.value.status == 404
    for status in ("deleted", "deprovisioning", "cancelled"):
        tenant_id = make_tenant(cp, status=status)
        with pytest.raises(Problem) as err:
            keys.create(cp, tenant_id, actor="test")
        assert err.value.status == 409
    assert count(cp.engine, api_keys) == 0
    with cp.engine.connect() as conn, pytest.raises(Problem) as err:
        keys.list_keys(conn, "nobody-000000")
    assert err.value.status == 404


# revoke


def test_revoke_is_tenant_scoped_and_idempotent(cp: ControlPlane) -> None:
    tenant_a, tenant_b = make_tenant(cp), make_tenant(cp)
    record, secret = keys.create(cp, tenant_a, actor="test")
    with pytest.raises(Problem) as err:
        keys.revoke(cp, record["id"], actor="test", tenant_id=tenant_b)
    assert err.value.status == 404
    with cp.engine.connect() as conn, pytest.raises(Problem):
        keys.get(conn, record["id"], tenant_id=tenant_b)
    with pytest.raises(Problem) as err:
        keys.revoke(cp, "key_missing", actor="test")
    assert err.value.status == 404

    revoked = keys.revoke(cp, record["id"], actor="test", tenant_id=tenant_a, now=T0)
    assert revoked["revoked_at"] == T0
    assert not keys.usable(revoked, T0)
    again = keys.revoke(cp, record["id"], actor="test", now=T0 + timedelta(hours=1))
    assert again["revoked_at"] == T0
    assert audit_types(cp.engine) == ["key.created", "key.revoked"]
    with cp.engine.connect() as conn:
        assert keys.get(conn, record["id"])["revoked_at"] == T0
        assert keys.hash_secret(secret) not in keys.active_by_hash(conn)


def test_expiry(sqlite_cp: ControlPlane) -> None:
    tenant_id = make_tenant(sqlite_cp)
    record, secret = keys.create(
        sqlite_cp, tenant_id, actor="test", expires_at=T0 + timedelta(days=1), now=T0
    )
    assert keys.usable(record, T0 + timedelta(hours=23))
    assert not keys.usable(record, T0 + timedelta(days=1))
    with sqlite_cp.engine.connect() as conn:
        assert keys.hash_secret(secret) in keys.active_by_hash(conn, T0)
        assert keys.hash_secret(secret) not in keys.active_by_hash(conn, T0 + timedelta(days=2))


# rotate


def test_rotation_keeps_both_keys_valid_for_the_overlap_only(cp: ControlPlane) -> None:
    tenant_id = make_tenant(cp)
    old, old_secret = keys.create(
        cp, tenant_id, actor="test", name="ci", scopes=["usage:read"], mode="test", now=T0
    )
    rotated_at = T0 + timedelta(days=3)
    new, new_secret = keys.rotate(
        cp, old["id"], actor="test", overlap=timedelta(hours=1), tenant_id=tenant_id,
        now=rotated_at,
    )
    assert new_secret != old_secret and keys.looks_valid(new_secret)
    assert (new["name"], new["scopes"], new["mode"]) == ("ci", ["usage:read"], "test")
    assert new["rotated_from"] == old["id"] and new["expires_at"] is None

    def active(at: datetime) -> set[str]:
        with cp.engine.connect() as conn:
            return {r["id"] for r in keys.active_by_hash(conn, at).values()}

    with cp.engine.connect() as conn:
        old_now = keys.get(conn, old["id"])
    assert old_now["expires_at"] == rotated_at + timedelta(hours=1)
    assert keys.usable(old_now, rotated_at + timedelta(minutes=59))
    assert not keys.usable(old_now, rotated_at + timedelta(minutes=60))
    assert active(rotated_at + timedelta(minutes=59)) == {old["id"], new["id"]}
    assert active(rotated_at + timedelta(minutes=61)) == {new["id"]}
    assert audit_types(cp.engine) == ["key.created", "key.rotated"]

    with pytest.raises(Problem) as err:
        keys.rotate(cp, old["id"], actor="test", now=rotated_at + timedelta(minutes=1))
    assert err.value.status == 409
    with pytest.raises(Problem) as err:
        keys.rotate(cp, old["id"], actor="test", now=rotated_at + timedelta(hours=2))
    assert err.value.status == 409
    assert count(cp.engine, api_keys) == 2


def test_rotation_never_extends_an_earlier_expiry(sqlite_cp: ControlPlane) -> None:
    tenant_id = make_tenant(sqlite_cp)
    old, _ = keys.create(
        sqlite_cp, tenant_id, actor="test", expires_at=T0 + timedelta(hours=2), now=T0
    )
    keys.rotate(sqlite_cp, old["id"], actor="test", overlap=timedelta(days=1), now=T0)
    with sqlite_cp.engine.connect() as conn:
        assert keys.get(conn, old["id"])["expires_at"] == T0 + timedelta(hours=2)


def test_rotation_refuses_revoked_foreign_and_bad_overlap(sqlite_cp: ControlPlane) -> None:
    tenant_id, other = make_tenant(sqlite_cp), make_tenant(sqlite_cp)
    record, _ = keys.create(sqlite_cp, tenant_id, actor="test")
    for overlap, tenant, status in (
        (timedelta(seconds=-1), None, 422),
        (timedelta(days=31), None, 422),
        (timedelta(hours=1), other, 404),
    ):
        with pytest.raises(Problem) as err:
            keys.rotate(sqlite_cp, record["id"], actor="test", overlap=overlap, tenant_id=tenant)
        assert err.value.status == status
    keys.revoke(sqlite_cp, record["id"], actor="test")
    with pytest.raises(Problem) as err:
        keys.rotate(sqlite_cp, record["id"], actor="test")
    assert err.value.status == 409
    assert count(sqlite_cp.engine, api_keys) == 1


def test_zero_overlap_ends_the_old_key_at_once(sqlite_cp: ControlPlane) -> None:
    tenant_id = make_tenant(sqlite_cp)
    old, _ = keys.create(sqlite_cp, tenant_id, actor="test", now=T0)
    keys.rotate(sqlite_cp, old["id"], actor="test", overlap=timedelta(0), now=T0)
    with sqlite_cp.engine.connect() as conn:
        assert not keys.usable(keys.get(conn, old["id"]), T0)


# no plaintext anywhere


def test_no_secret_in_store_audit_notifications_or_logs(
    cp: ControlPlane, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.engine")
    pubsub = redis_client.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(cp.settings.change_channel)
    tenant_id = make_tenant(cp)

    record, first = keys.create(cp, tenant_id, actor="test")
    _, second = keys.rotate(cp, record["id"], actor="test")
    keys.revoke(cp, record["id"], actor="test")
    token, third = admin_tokens.create(cp, actor="test", name="ops", role="platform")
    _, fourth = admin_tokens.create(cp, actor="test", name="t", role="tenant", tenant_id=tenant_id)
    with cp.engine.connect() as conn:
        assert admin_tokens.authenticate(conn, third) is not None
        assert admin_tokens.authenticate(conn, fourth) is not None
    secrets_made = [first, second, third, fourth]

    store = dump_store(cp.engine)
    assert record["id"] in store and token["id"] in store and keys.hash_secret(first) in store
    logged = "\n".join(
        f"{r.getMessage()} {r.__dict__!r}" for r in caplog.records
    )
    assert "api key created" in logged and "UPDATE api_keys" in logged
    messages = []
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        messages.append(repr(message))
    pubsub.close()
    notified = "\n".join(messages)
    assert "key.rotated" in notified
    for secret in secrets_made:
        body = secret.split("_")[-1]
        for needle in (secret, body, body[:-keys.CHECKSUM_LEN]):
            assert needle not in store
            assert needle not in logged
            assert needle not in notified



# concurrency: PostgreSQL row locks and, on SQLite, guards inside the writes decide


def race(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls at the same moment; each result is a value or the exception raised."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        barrier.wait()
        try:
            return call()
        except Problem as problem:
            return problem

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_concurrent_rotations_of_one_key_yield_one_successor(cp: ControlPlane) -> None:
    tenant_id = make_tenant(cp)
    for _ in range(5):
        key_id = keys.create(cp, tenant_id, actor="test")[0]["id"]
        results = race(*[partial(keys.rotate, cp, key_id, actor="test")] * 3)
        assert sorted(isinstance(r, tuple) for r in results) == [False, False, True]
        assert all(r.status == 409 for r in results if isinstance(r, Problem))
        with cp.engine.connect() as conn:
            successors = conn.execute(
                select(func.count()).where(api_keys.c.rotated_from == key_id)
            ).scalar_one()
        assert successors == 1


def test_concurrent_revokes_audit_once(cp: ControlPlane) -> None:
    tenant_id = make_tenant(cp)
    record, _ = keys.create(cp, tenant_id, actor="test")
    results = race(*[lambda: keys.revoke(cp, record["id"], actor="test")] * 3)
    assert len({r["revoked_at"] for r in results}) == 1
    assert audit_types(cp.engine) == ["key.created", "key.revoked"]
