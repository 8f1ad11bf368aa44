from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
from closing import close, make_tenant
from sqlalchemy import func, select

from tenancy import admin_tokens, keys
from tenancy.admin_tokens import AdminPrincipal
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem
from tenancy.tables import admin_tokens as admin_tokens_table
from tenancy.tables import audit_events

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def authenticate(cp: ControlPlane, secret: str, now: datetime | None = None) -> Any:
    with cp.engine.connect() as conn:
        return admin_tokens.authenticate(conn, secret, now)


def stored_tokens(cp: ControlPlane) -> int:
    with cp.engine.connect() as conn:
        return int(
            conn.execute(select(func.count()).select_from(admin_tokens_table)).scalar_one()
        )


def test_roles_authenticate_to_their_principal(cp: ControlPlane) -> None:
    tenant_id = make_tenant(cp)
    platform, platform_secret = admin_tokens.create(
        cp, actor="cli", name="ops", role="platform", now=T0
    )
    bound, bound_secret = admin_tokens.create(
        cp, actor="cli", name="acme-admin", role="tenant", tenant_id=tenant_id,
        now=T0 + timedelta(seconds=1),
    )
    assert admin_tokens.TOKEN_PATTERN.fullmatch(platform_secret)
    assert admin_tokens.looks_valid(bound_secret) and not keys.looks_valid(bound_secret)
    assert "hash" not in platform
    assert authenticate(cp, platform_secret) == AdminPrincipal(
        token_id=platform["id"], role="platform", tenant_id=None, name="ops"
    )
    assert authenticate(cp, bound_secret) == AdminPrincipal(
        token_id=bound["id"], role="tenant", tenant_id=tenant_id, name="acme-admin"
    )
    with cp.engine.connect() as conn:
        assert admin_tokens.count_platform_tokens(conn) == 1
        assert admin_tokens.list_tokens(conn) == [platform, bound]
        types = conn.execute(
            select(audit_events.c.type)
            .where(audit_events.c.subject.in_([platform["id"], bound["id"]]))
        ).scalars().all()
    assert types == ["admin_token.created", "admin_token.created"]


def test_wrong_or_malformed_secrets_get_nothing(sqlite_cp: ControlPlane) -> None:
    tenant_id = make_tenant(sqlite_cp)
    _, secret = admin_tokens.create(sqlite_cp, actor="cli", name="ops", role="platform")
    _, api_key = keys.create(sqlite_cp, tenant_id, actor="cli")
    other = admin_tokens.PREFIX + secret[6:-1] + ("A" if secret[-1] != "A" else "B")
    for candidate in ("", secret[:-1], secret + "x", other, api_key, admin_tokens.PREFIX):
        assert authenticate(sqlite_cp, candidate) is None, candidate
    assert authenticate(sqlite_cp, keys.mint(admin_tokens.PREFIX)) is None


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"role": "root"}, 422),
        ({"role": "tenant"}, 422),
        ({"role": "platform", "tenant_id": "acme-000000"}, 422),
        ({"role": "tenant", "tenant_id": "nobody-000000"}, 404),
        ({"role": "platform", "name": ""}, 422),
        ({"role": "platform", "expires_at": T0 - timedelta(minutes=1)}, 422),
    ],
)
def test_bad_input_writes_nothing(
    sqlite_cp: ControlPlane, kwargs: dict[str, Any], status: int
) -> None:
    args = {"name": "ops", **kwargs}
    with pytest.raises(Problem) as err:
        admin_tokens.create(sqlite_cp, actor="cli", now=T0, **args)
    assert err.value.status == status
    assert stored_tokens(sqlite_cp) == 0


def test_closed_tenant_gets_no_token_and_deleted_tenant_loses_its_token(cp: ControlPlane) -> None:
    closed = make_tenant(cp, status="deprovisioning")
    with pytest.raises(Problem) as err:
        admin_tokens.create(cp, actor="cli", name="t", role="tenant", tenant_id=closed)
    assert err.value.status == 409
    tenant_id = make_tenant(cp)
    _, secret = admin_tokens.create(cp, actor="cli", name="t", role="tenant", tenant_id=tenant_id)
    assert authenticate(cp, secret) is not None
    close(cp, tenant_id, "deleted")
    assert authenticate(cp, secret) is None


def test_expired_tokens_are_rejected_and_not_counted(cp: ControlPlane) -> None:
    _, secret = admin_tokens.create(
        cp, actor="cli", name="ops", role="platform", expires_at=T0 + timedelta(hours=1), now=T0
    )
    assert authenticate(cp, secret, T0 + timedelta(minutes=59)) is not None
    assert authenticate(cp, secret, T0 + timedelta(hours=1)) is None
    with cp.engine.connect() as conn:
        assert admin_tokens.count_platform_tokens(conn, T0) == 1
        assert admin_tokens.count_platform_tokens(conn, T0 + timedelta(hours=2)) == 0


def test_revoke_keeps_one_platform_token_and_is_idempotent(cp: ControlPlane) -> None:
    first, first_secret = admin_tokens.create(cp, actor="cli", name="ops", role="platform")
    with pytest.raises(Problem) as err:
        admin_tokens.revoke(cp, first["id"], actor="cli")
    assert err.value.status == 409
    assert authenticate(cp, first_secret) is not None

    second, second_secret = admin_tokens.create(cp, actor="cli", name="ops2", role="platform")
    revoked = admin_tokens.revoke(cp, first["id"], actor="cli", now=T0)
    assert revoked["revoked_at"] == T0
    assert authenticate(cp, first_secret) is None
    assert authenticate(cp, second_secret) is not None
    again = admin_tokens.revoke(cp, first["id"], actor="cli")
    assert again["revoked_at"] == T0
    with pytest.raises(Problem) as err:
        admin_tokens.revoke(cp, second["id"], actor="cli")
    assert err.value.status == 409
    with pytest.raises(Problem) as err:
        admin_tokens.revoke(cp, "adm_missing", actor="cli")
    assert err.value.status == 404
    with cp.engine.connect() as conn:
        assert admin_tokens.count_platform_tokens(conn) == 1
        types = conn.execute(
            select(audit_events.c.type)
            .where(audit_events.c.type.startswith("admin_token."))
            .order_by(audit_events.c.seq)
        ).scalars().all()
    assert types == ["admin_token.created", "admin_token.created", "admin_token.revoked"]


def test_tenant_tokens_can_always_be_revoked(sqlite_cp: ControlPlane) -> None:
    tenant_id = make_tenant(sqlite_cp)
    token, secret = admin_tokens.create(
        sqlite_cp, actor="cli", name="t", role="tenant", tenant_id=tenant_id
    )
    admin_tokens.revoke(sqlite_cp, token["id"], actor="cli")
    assert authenticate(sqlite_cp, secret) is None


def revoke_together(cp: ControlPlane, barrier: threading.Barrier, token_id: str) -> int:
    barrier.wait()
    try:
        admin_tokens.revoke(cp, token_id, actor="cli")
    except Problem as problem:
        return problem.status
    return 200


def test_concurrent_revokes_never_remove_the_last_platform_token(cp: ControlPlane) -> None:
    for _ in range(3):
        first, _ = admin_tokens.create(cp, actor="cli", name="a", role="platform")
        second, _ = admin_tokens.create(cp, actor="cli", name="b", role="platform")
        with cp.engine.connect() as conn:
            for token in admin_tokens.list_tokens(conn):
                if token["id"] not in (first["id"], second["id"]) and token["revoked_at"] is None:
                    admin_tokens.revoke(cp, token["id"], actor="cli")
        barrier = threading.Barrier(2)
        with ThreadPoolExecutor(2) as pool:
            statuses = sorted(
                pool.map(partial(revoke_together, cp, barrier), [first["id"], second["id"]])
            )
        assert statuses == [200, 409]
        with cp.engine.connect() as conn:
            assert admin_tokens.count_platform_tokens(conn) == 1
