"""Tenant API keys: minting, the secret format, and the key lifecycle.

A key reads `tw_<mode>_<43 random base62><6 base62 CRC32>`. The fixed prefix lets secret
scanners find leaked keys; the checksum lets the gateway drop a mistyped or forged key
without touching its key map. Only the SHA-256 hex of the secret is stored: the gateway
hashes the presented secret and looks the digest up in its in-memory snapshot, so a stolen
database holds nothing that authenticates. Grammar and lifecycle rules: docs/keys.md.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, RowMapping, exists, insert, select, update

from tenancy.controlplane import ControlPlane, Tx
from tenancy.problems import conflict, invalid, not_found
from tenancy.tables import api_keys, tenants

log = logging.getLogger("tollway.keys")

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_LEN = 43  # 43 * log2(62) = 256.03 random bits
CHECKSUM_LEN = 6  # 62**6 > 2**32, so every CRC32 has exactly one encoding
MODES = ("live", "test")
KEY_PATTERN = re.compile(r"tw_(?:live|test)_[0-9A-Za-z]{49}")
DISPLAY_BODY = 4
MAX_SCOPES = 32
MAX_OVERLAP = timedelta(days=30)
CLOSED_TENANT = frozenset({"cancelled", "deprovisioning", "deleted"})
_SCOPE = re.compile(r"[a-z][a-z0-9_.-]{0,47}:(?:[a-z][a-z0-9_.-]{0,47}|\*)")


def checksum(text: str) -> str:
    """CRC32 of everything before the checksum, prefix included, as fixed-width base62."""
    value = zlib.crc32(text.encode("ascii"))
    out = []
    for _ in range(CHECKSUM_LEN):
        value, digit = divmod(value, 62)
        out.append(ALPHABET[digit])
    return "".join(reversed(out))


def mint(prefix: str) -> str:
    body = "".join(secrets.choice(ALPHABET) for _ in range(BODY_LEN))
    return prefix + body + checksum(prefix + body)


def well_formed(secret: str, pattern: re.Pattern[str]) -> bool:
    """Shape and checksum only; a miss costs no lookup. The checksum is not secret, but the
    comparison is constant-time anyway so timing says nothing about how close a guess was."""
    if pattern.fullmatch(secret) is None:
        return False
    return hmac.compare_digest(secret[-CHECKSUM_LEN:], checksum(secret[:-CHECKSUM_LEN]))


def looks_valid(secret: str) -> bool:
    return well_formed(secret, KEY_PATTERN)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def now_utc() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything written here is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def usable(record: dict[str, Any], now: datetime | None = None) -> bool:
    """The per-request check on a snapshot record: expiry is not in the snapshot's refresh."""
    if record["revoked_at"] is not None:
        return False
    expires_at = record["expires_at"]
    return expires_at is None or expires_at > (now or now_utc())


def check_expiry(expires_at: datetime | None, now: datetime) -> datetime | None:
    if expires_at is None:
        return None
    if expires_at.tzinfo is None:
        raise invalid("expires_at must carry a timezone", field="expires_at")
    if expires_at <= now:
        raise invalid("expires_at must be in the future", field="expires_at")
    return expires_at.astimezone(UTC)


def check_name(name: str) -> str:
    if not isinstance(name, str):
        raise invalid("name must be a string", field="name")
    name = name.strip()
    if not 1 <= len(name) <= 100 or not name.isprintable():
        raise invalid("name must be 1 to 100 printable characters", field="name")
    return name


def check_scopes(scopes: Iterable[str]) -> list[str]:
    if isinstance(scopes, str):
        raise invalid("scopes must be a list of scopes, not one string", field="scopes")
    given = list(scopes)
    for scope in given:
        if not isinstance(scope, str) or (scope != "*" and _SCOPE.fullmatch(scope) is None):
            raise invalid(
                f"scope {scope!r} is not '*' or 'resource:action' (lowercase)", field="scopes"
            )
    result = list(dict.fromkeys(given))
    if not result:
        raise invalid("at least one scope is required", field="scopes")
    if len(result) > MAX_SCOPES:
        raise invalid(f"at most {MAX_SCOPES} scopes are allowed", field="scopes")
    if "*" in result and len(result) > 1:
        raise invalid("'*' already grants everything; give it alone", field="scopes")
    return result


def lock_open_tenant(conn: Connection, tenant_id: str) -> None:
    """Share-lock the tenant row so it cannot be deleted under a credential being minted."""
    status = conn.execute(
        select(tenants.c.status).where(tenants.c.id == tenant_id).with_for_update(read=True)
    ).scalar_one_or_none()
    if status is None:
        raise not_found("tenant", tenant_id)
    if status in CLOSED_TENANT:
        raise conflict(f"tenant {tenant_id!r} is {status}; it cannot get new credentials")


def _record(row: RowMapping) -> dict[str, Any]:
    return {
        "id": row["id"],
        "tenant_id": row["tenant_id"],
        "name": row["name"],
        "mode": row["mode"],
        "prefix": row["prefix"],
        "scopes": list(row["scopes"]),
        "created_at": aware(row["created_at"]),
        "expires_at": aware(row["expires_at"]),
        "revoked_at": aware(row["revoked_at"]),
        "last_used_at": aware(row["last_used_at"]),
        "rotated_from": row["rotated_from"],
    }


def _insert(
    conn: Connection,
    *,
    tenant_id: str,
    name: str,
    mode: str,
    scopes: list[str],
    expires_at: datetime | None,
    now: datetime,
    rotated_from: str | None = None,
) -> tuple[dict[str, Any], str]:
    prefix = f"tw_{mode}_"
    secret = mint(prefix)
    record: dict[str, Any] = {
        "id": "key_" + secrets.token_hex(12),
        "tenant_id": tenant_id,
        "name": name,
        "mode": mode,
        "prefix": secret[: len(prefix) + DISPLAY_BODY],
        "scopes": scopes,
        "created_at": now,
        "expires_at": expires_at,
        "revoked_at": None,
        "last_used_at": None,
        "rotated_from": rotated_from,
    }
    conn.execute(insert(api_keys), {**record, "hash": hash_secret(secret)})
    return record, secret


@dataclass(frozen=True)
class NewKey:
    """A validated key request, so a caller can check it before opening its transaction."""

    name: str
    scopes: list[str]
    mode: str
    expires_at: datetime | None


def new_key(
    default_mode: str,
    *,
    name: str = "default",
    scopes: Iterable[str] = ("*",),
    mode: str | None = None,
    expires_at: datetime | None = None,
    now: datetime,
) -> NewKey:
    name = check_name(name)
    scope_list = check_scopes(scopes)
    mode = mode or default_mode
    if mode not in MODES:
        raise invalid(f"mode must be one of {', '.join(MODES)}", field="mode")
    return NewKey(name, scope_list, mode, check_expiry(expires_at, now))


def create_in(
    tx: Tx, tenant_id: str, key: NewKey, now: datetime, *, tenant_is_new: bool = False
) -> tuple[dict[str, Any], str]:
    """Mint a key inside the caller's transaction, with its audit event, so a tenant and its
    first key can commit together (tenancy.onboarding). `tenant_is_new`: the tenant row was
    inserted by this transaction, so no one else can see, close or delete it; the share lock
    and status check would only cost a round trip."""
    if not tenant_is_new:
        lock_open_tenant(tx.conn, tenant_id)
    record, secret = _insert(
        tx.conn, tenant_id=tenant_id, name=key.name, mode=key.mode, scopes=key.scopes,
        expires_at=key.expires_at, now=now,
    )
    tx.audit("key.created", record["id"], tenant_id=tenant_id, after=record)
    return record, secret


def create(
    cp: ControlPlane,
    tenant_id: str,
    *,
    actor: str,
    name: str = "default",
    scopes: Iterable[str] = ("*",),
    mode: str | None = None,
    expires_at: datetime | None = None,
    now: datetime | None = None,
) -> tuple[dict[str, Any], str]:
    """Mint a key; the secret is returned here and never again."""
    now = now or now_utc()
    key = new_key(
        cp.settings.key_environment, name=name, scopes=scopes, mode=mode,
        expires_at=expires_at, now=now,
    )
    with cp.transaction(actor) as tx:
        record, secret = create_in(tx, tenant_id, key, now)
    log.info("api key created", extra={"key_id": record["id"], "tenant_id": tenant_id})
    return record, secret


def list_keys(conn: Connection, tenant_id: str) -> list[dict[str, Any]]:
    """Every key of the tenant, revoked ones included, oldest first."""
    if conn.execute(select(tenants.c.id).where(tenants.c.id == tenant_id)).first() is None:
        raise not_found("tenant", tenant_id)
    rows = conn.execute(
        select(api_keys)
        .where(api_keys.c.tenant_id == tenant_id)
        .order_by(api_keys.c.created_at, api_keys.c.id)
    ).mappings()
    return [_record(row) for row in rows]


def get(conn: Connection, key_id: str, *, tenant_id: str | None = None) -> dict[str, Any]:
    """A key by id; with `tenant_id`, another tenant's key is reported as missing."""
    return _record(_fetch(conn, key_id, tenant_id, lock=False))


def _fetch(conn: Connection, key_id: str, tenant_id: str | None, *, lock: bool) -> RowMapping:
    query = select(api_keys).where(api_keys.c.id == key_id)
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).mappings().first()
    if row is None or (tenant_id is not None and row["tenant_id"] != tenant_id):
        raise not_found("api key", key_id)
    return row


def active_by_hash(conn: Connection, now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """The gateway snapshot: hash -> record for every key not yet revoked or expired."""
    now = now or now_utc()
    rows = conn.execute(
        select(api_keys).where(
            api_keys.c.revoked_at.is_(None),
            api_keys.c.expires_at.is_(None) | (api_keys.c.expires_at > now),
        )
    ).mappings()
    return {row["hash"]: _record(row) for row in rows}


def revoke(
    cp: ControlPlane,
    key_id: str,
    *,
    actor: str,
    tenant_id: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Idempotent: revoking a revoked key returns it unchanged and audits nothing."""
    now = now or now_utc()
    with cp.transaction(actor) as tx:
        before = _record(_fetch(tx.conn, key_id, tenant_id, lock=True))
        revoked = tx.conn.execute(
            update(api_keys)
            .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        if revoked.rowcount == 0:
            return get(tx.conn, key_id)
        after = {**before, "revoked_at": now}
        tx.audit("key.revoked", key_id, tenant_id=before["tenant_id"], before=before, after=after)
    log.info("api key revoked", extra={"key_id": key_id, "tenant_id": before["tenant_id"]})
    return after


def rotate(
    cp: ControlPlane,
    key_id: str,
    *,
    actor: str,
    overlap: timedelta = timedelta(hours=24),
    tenant_id: str | None = None,
    now: datetime | None = None,
) -> tuple[dict[str, Any], str]:
    """Mint a successor and let the old key live `overlap` longer, so clients can switch
    without an outage. A key is rotated once; to rotate again, rotate its successor."""
    now = now or now_utc()
    if not timedelta(0) <= overlap <= MAX_OVERLAP:
        raise invalid(f"overlap must be between 0 and {MAX_OVERLAP.days} days", field="overlap")
    with cp.transaction(actor) as tx:
        before = _record(_fetch(tx.conn, key_id, tenant_id, lock=True))
        if not usable(before, now):
            raise conflict(f"api key {key_id!r} is revoked or expired; create a new key instead")
        successor = tx.conn.execute(
            select(api_keys.c.id).where(api_keys.c.rotated_from == key_id)
        ).scalar_one_or_none()
        if successor is not None:
            raise conflict(f"api key {key_id!r} was already rotated to {successor!r}")
        lock_open_tenant(tx.conn, before["tenant_id"])
        old_expiry = now + overlap
        if before["expires_at"] is not None:
            old_expiry = min(old_expiry, before["expires_at"])
        # The guard repeats the checks above in the write itself: on SQLite the reads ran
        # before the write lock was taken, so only this statement sees a concurrent rotation.
        successors = api_keys.alias("successors")
        claimed = tx.conn.execute(
            update(api_keys)
            .where(
                api_keys.c.id == key_id,
                api_keys.c.revoked_at.is_(None),
                api_keys.c.expires_at.is_(None) | (api_keys.c.expires_at > now),
                ~exists().where(successors.c.rotated_from == key_id),
            )
            .values(expires_at=old_expiry)
        )
        if claimed.rowcount == 0:
            raise conflict(f"api key {key_id!r} was rotated or revoked meanwhile")
        record, secret = _insert(
            tx.conn, tenant_id=before["tenant_id"], name=before["name"], mode=before["mode"],
            scopes=before["scopes"], expires_at=None, now=now, rotated_from=key_id,
        )
        old_after = {**before, "expires_at": old_expiry}
        tx.audit(
            "key.rotated", key_id, tenant_id=before["tenant_id"], before=before,
            after={**old_after, "successor": record},
        )
    log.info(
        "api key rotated",
        extra={"key_id": key_id, "successor_id": record["id"], "tenant_id": before["tenant_id"]},
    )
    return record, secret
