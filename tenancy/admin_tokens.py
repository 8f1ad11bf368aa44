"""Admin tokens: bearer credentials for the admin API, kept apart from tenant API keys.

They share the key format and hashing (tenancy.keys) under their own prefix, `twadm_`, so a
scanner can tell an admin token from a tenant key and the admin API can refuse the wrong kind
before any lookup. A `platform` token may do everything; a `tenant` token is bound to one
tenant. Admin traffic is light, so unlike API keys they are checked against the store.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, RowMapping, exists, func, insert, select, update

from tenancy.controlplane import ControlPlane
from tenancy.keys import (
    aware,
    check_expiry,
    check_name,
    hash_secret,
    lock_open_tenant,
    mint,
    now_utc,
    well_formed,
)
from tenancy.problems import Problem, conflict, invalid, not_found
from tenancy.tables import admin_tokens, tenants

log = logging.getLogger("tollway.admin_tokens")

PREFIX = "twadm_"
TOKEN_PATTERN = re.compile(r"twadm_[0-9A-Za-z]{49}")
PLATFORM = "platform"
TENANT = "tenant"
ROLES = (PLATFORM, TENANT)


@dataclass(frozen=True, slots=True)
class AdminPrincipal:
    token_id: str
    role: str
    tenant_id: str | None
    name: str


def looks_valid(secret: str) -> bool:
    return well_formed(secret, TOKEN_PATTERN)


def _record(row: RowMapping) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "role": row["role"],
        "tenant_id": row["tenant_id"],
        "created_at": aware(row["created_at"]),
        "expires_at": aware(row["expires_at"]),
        "revoked_at": aware(row["revoked_at"]),
    }


def _usable(now: datetime, table: Any = admin_tokens) -> Any:
    return table.c.revoked_at.is_(None) & (
        table.c.expires_at.is_(None) | (table.c.expires_at > now)
    )


def create(
    cp: ControlPlane,
    *,
    actor: str,
    name: str,
    role: str,
    tenant_id: str | None = None,
    expires_at: datetime | None = None,
    now: datetime | None = None,
) -> tuple[dict[str, Any], str]:
    """Mint a token; the secret is returned here and never again."""
    now = now or now_utc()
    name = check_name(name)
    if role not in ROLES:
        raise invalid(f"role must be one of {', '.join(ROLES)}", field="role")
    if role == TENANT and not tenant_id:
        raise invalid("a tenant token needs the tenant_id it is bound to", field="tenant_id")
    if role == PLATFORM and tenant_id is not None:
        raise invalid("a platform token is not bound to a tenant", field="tenant_id")
    expires_at = check_expiry(expires_at, now)
    secret = mint(PREFIX)
    record: dict[str, Any] = {
        "id": "adm_" + secrets.token_hex(12),
        "name": name,
        "role": role,
        "tenant_id": tenant_id,
        "created_at": now,
        "expires_at": expires_at,
        "revoked_at": None,
    }
    with cp.transaction(actor) as tx:
        if tenant_id is not None:
            lock_open_tenant(tx.conn, tenant_id)
        tx.conn.execute(insert(admin_tokens).values(**record, hash=hash_secret(secret)))
        tx.audit("admin_token.created", record["id"], tenant_id=tenant_id, after=record)
    log.info("admin token created", extra={"token_id": record["id"], "role": role})
    return record, secret


def list_tokens(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(admin_tokens).order_by(admin_tokens.c.created_at, admin_tokens.c.id)
    ).mappings()
    return [_record(row) for row in rows]


def revoke(
    cp: ControlPlane, token_id: str, *, actor: str, now: datetime | None = None
) -> dict[str, Any]:
    """Idempotent like key revocation. The last usable platform token cannot be revoked:
    mint its replacement first, so the platform is never locked out of its own admin API."""
    now = now or now_utc()
    with cp.transaction(actor) as tx:
        row = _fetch(tx.conn, token_id)
        if row["role"] == PLATFORM:
            _keep_one_platform_token(tx.conn, token_id, now)
        # The guard repeats the last-token check in the write itself: on SQLite the reads
        # ran before the write lock was taken, so only this statement sees a concurrent revoke.
        others = admin_tokens.alias("others")
        another = exists().where(
            others.c.role == PLATFORM, others.c.id != token_id, _usable(now, others)
        )
        revoked = tx.conn.execute(
            update(admin_tokens)
            .where(
                admin_tokens.c.id == token_id,
                admin_tokens.c.revoked_at.is_(None),
                (admin_tokens.c.role != PLATFORM) | another,
            )
            .values(revoked_at=now)
        )
        if revoked.rowcount == 0:
            current = _record(_fetch(tx.conn, token_id))
            if current["revoked_at"] is None:
                raise _last_platform_token()
            return current
        before = _record(row)
        after = {**before, "revoked_at": now}
        tx.audit(
            "admin_token.revoked", token_id, tenant_id=before["tenant_id"], before=before,
            after=after,
        )
    log.info("admin token revoked", extra={"token_id": token_id})
    return after


def _last_platform_token() -> Problem:
    return conflict("this is the last platform token; create another before revoking it")


def _fetch(conn: Connection, token_id: str) -> RowMapping:
    row = conn.execute(select(admin_tokens).where(admin_tokens.c.id == token_id)).mappings().first()
    if row is None:
        raise not_found("admin token", token_id)
    return row


def _keep_one_platform_token(conn: Connection, token_id: str, now: datetime) -> None:
    """Lock every usable platform token, in id order so concurrent revokes cannot deadlock,
    and refuse to revoke the only one."""
    usable = conn.execute(
        select(admin_tokens.c.id)
        .where(admin_tokens.c.role == PLATFORM, _usable(now))
        .order_by(admin_tokens.c.id)
        .with_for_update()
    ).scalars().all()
    if list(usable) == [token_id]:
        raise _last_platform_token()


def authenticate(
    conn: Connection, secret: str, now: datetime | None = None
) -> AdminPrincipal | None:
    """The principal behind a presented secret, or None for anything not currently valid.
    A tenant token dies with its tenant's deletion even before the row is purged."""
    if not looks_valid(secret):
        return None
    now = now or now_utc()
    row = conn.execute(
        select(admin_tokens, tenants.c.status)
        .outerjoin(tenants, tenants.c.id == admin_tokens.c.tenant_id)
        .where(admin_tokens.c.hash == hash_secret(secret), _usable(now))
    ).mappings().first()
    if row is None or row["status"] == "deleted":
        return None
    return AdminPrincipal(
        token_id=row["id"], role=row["role"], tenant_id=row["tenant_id"], name=row["name"]
    )


def count_platform_tokens(conn: Connection, now: datetime | None = None) -> int:
    """Usable platform tokens; zero on first start tells the CLI to bootstrap one."""
    return int(
        conn.execute(
            select(func.count())
            .select_from(admin_tokens)
            .where(admin_tokens.c.role == PLATFORM, _usable(now or now_utc()))
        ).scalar_one()
    )
