"""The gateway's immutable, in-process view of the control plane.

Requests never query the store: they read a `Snapshot` built by a handful of bulk queries
(one per table), later patched by reloading only the tenants that audit events name.
Everything a request needs is derived here, once per load: lowercase host maps, the tenant's
plan, its ZoneInfo, epoch-second deadlines, route scope rules and inline JWKS. A new snapshot
replaces the old one wholesale, so a request sees one consistent view.

One tenant's bad settings (an unknown timezone, a malformed route rule) are logged and
defaulted rather than failing the load: a typo by one tenant must not stop every replica from
picking up another tenant's key revocation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jwt import PyJWK
from sqlalchemy import Connection, Engine, RowMapping, Select, func, select

from gateway.jwt_auth import parse_jwks
from tenancy import audit
from tenancy.plans import Plan
from tenancy.tables import api_keys, audit_events, domains, tenants
from tenancy.tables import plans as plans_table

log = logging.getLogger("tollway.snapshot")

DEFAULT_DUNNING_DAYS = 7
SEEN_WINDOW = 1024  # how far below the newest audit seq a late commit is still noticed
MAX_INCREMENTAL = 500  # more touched tenants than this and a full load is cheaper
NOT_IN_SNAPSHOT = ("admin_token.",)  # tenant-less events that change nothing loaded here
MISCONFIGURED_SCOPE = "!misconfigured-route"  # not a valid key scope, so never granted


@dataclass(frozen=True, slots=True)
class RouteRule:
    """Requests whose path is `prefix` or below it need every scope in `scopes`."""

    prefix: str
    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TenantRecord:
    id: str
    name: str
    status: str
    region: str
    currency: str
    timezone: str
    tz: ZoneInfo
    subdomain: str | None
    domains: tuple[str, ...]
    plan: Plan | None
    upstream: str | None
    settings: Mapping[str, Any]
    trial_ends_ts: float | None
    status_changed_ts: float
    dunning_days: int
    routes: tuple[RouteRule, ...]
    jwks_url: str | None
    jwks: Mapping[str, PyJWK] | None
    jwt_issuer: str | None
    jwt_audience: str | None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    tenant_id: str
    name: str
    mode: str
    prefix: str
    scopes: frozenset[str]
    expires_ts: float | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    tenants: Mapping[str, TenantRecord]
    by_subdomain: Mapping[str, TenantRecord]
    by_domain: Mapping[str, TenantRecord]
    keys: Mapping[str, KeyRecord]
    plans: Mapping[tuple[str, int], Plan]
    version: int  # the highest audit seq reflected
    seen: frozenset[int]  # every reflected audit seq in (version - SEEN_WINDOW, version]
    loaded_at: float


def load_snapshot(engine: Engine) -> Snapshot:
    """Everything, in one query per table. Blocking: call it in a worker thread."""
    with _reading(engine) as conn:
        version, seen = _position(conn)
        return _build(conn, version, seen, None, set())


def refresh_snapshot(engine: Engine, old: Snapshot) -> Snapshot:
    """`old` plus the changes it has not seen, reloading only the tenants those audit events
    name: with many tenants a full load costs far more CPU (and GIL) than the change.
    Events that are not about one tenant (a new plan version) force a full load."""
    with _reading(engine) as conn:
        version, seen = _position(conn)
        events = conn.execute(
            select(audit_events.c.seq, audit_events.c.tenant_id, audit_events.c.type).where(
                audit_events.c.seq > old.version - SEEN_WINDOW, audit_events.c.seq <= version
            )
        ).all()
        touched: set[str] = set()
        for seq, tenant_id, kind in events:
            if seq in old.seen:
                continue
            if tenant_id is None:
                if not kind.startswith(NOT_IN_SNAPSHOT):
                    return _build(conn, version, seen, None, set())
            else:
                touched.add(tenant_id)
        if len(touched) > MAX_INCREMENTAL:
            return _build(conn, version, seen, None, set())
        return _build(conn, version, seen, old, touched)


@contextmanager
def _reading(engine: Engine) -> Iterator[Connection]:
    """On PostgreSQL every query of a load sees one REPEATABLE READ snapshot, so the result is
    exactly the state at `version`. On SQLite the position is read first, so the result
    reflects at least `version`; a change racing the load only costs one more reload."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        yield conn


def _position(conn: Connection) -> tuple[int, frozenset[int]]:
    """The highest audit seq and the recent seqs below it. Sequence numbers are taken at
    insert but become visible at commit, so a slow transaction can commit below `version`;
    the refresher spots it as a new member of the recent window (see `changed`)."""
    version = audit.latest_seq(conn)
    seen = conn.execute(
        select(audit_events.c.seq).where(
            audit_events.c.seq > version - SEEN_WINDOW, audit_events.c.seq <= version
        )
    ).scalars()
    return version, frozenset(seen)


def changed(conn: Connection, snapshot: Snapshot) -> bool:
    """The cheap periodic check: a newer event, or a late commit inside the recent window."""
    count, top = conn.execute(
        select(func.count(), func.coalesce(func.max(audit_events.c.seq), 0)).where(
            audit_events.c.seq > snapshot.version - SEEN_WINDOW
        )
    ).one()
    return bool(top > snapshot.version or count != len(snapshot.seen))


def _build(
    conn: Connection, version: int, seen: frozenset[int], old: Snapshot | None, touched: set[str]
) -> Snapshot:
    """A full load when `old` is None, else `old` with the `touched` tenants reloaded."""
    tenant_query, domain_query, key_query = select(tenants), select(domains), _active_keys()
    plan_map: Mapping[tuple[str, int], Plan]
    if old is None:
        plan_map = _plans(conn.execute(select(plans_table)).mappings())
        tenant_map: dict[str, TenantRecord] = {}
        key_map: dict[str, KeyRecord] = {}
    else:
        plan_map = old.plans
        tenant_map = {t: r for t, r in old.tenants.items() if t not in touched}
        key_map = {h: k for h, k in old.keys.items() if k.tenant_id not in touched}
        ids = sorted(touched)
        tenant_query = tenant_query.where(tenants.c.id.in_(ids))
        domain_query = domain_query.where(domains.c.tenant_id.in_(ids))
        key_query = key_query.where(api_keys.c.tenant_id.in_(ids))
    tenant_domains: dict[str, list[str]] = {}
    for domain, tenant_id in conn.execute(domain_query).all():
        tenant_domains.setdefault(tenant_id, []).append(host_key(domain))
    for row in conn.execute(tenant_query).mappings():
        plan = plan_map.get((row["plan_id"], row["plan_version"]))
        tenant_map[row["id"]] = _tenant(row, plan, tuple(tenant_domains.get(row["id"], ())))
    for row in conn.execute(key_query).mappings():
        if row["tenant_id"] in tenant_map:
            key_map[row["hash"]] = _key(row)
    return Snapshot(
        tenants=tenant_map,
        by_subdomain={t.subdomain: t for t in tenant_map.values() if t.subdomain},
        by_domain={d: t for t in tenant_map.values() for d in t.domains},
        keys=key_map, plans=plan_map, version=version, seen=seen, loaded_at=time.time(),
    )


def _active_keys() -> Select[Any]:
    """Keys not revoked or expired at load; the gateway re-checks expiry per request."""
    now = datetime.now(UTC)
    return select(api_keys).where(
        api_keys.c.revoked_at.is_(None),
        api_keys.c.expires_at.is_(None) | (api_keys.c.expires_at > now),
    )


def host_key(host: str) -> str:
    """The form hosts are compared in: lowercase, without a trailing dot."""
    return host.lower().rstrip(".")


def _plans(rows: Iterable[RowMapping]) -> dict[tuple[str, int], Plan]:
    out = {}
    for row in rows:
        try:
            out[row["plan_id"], row["version"]] = Plan.from_row(row)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("skipping malformed plan %s v%s: %s", row["plan_id"], row["version"], exc)
    return out


def _tenant(row: RowMapping, plan: Plan | None, hosts: tuple[str, ...]) -> TenantRecord:
    tenant_id: str = row["id"]
    settings: Mapping[str, Any] = row["settings"] if isinstance(row["settings"], dict) else {}
    return TenantRecord(
        id=tenant_id, name=row["name"], status=row["status"], region=row["region"],
        currency=row["currency"], timezone=row["timezone"], tz=_zone(tenant_id, row["timezone"]),
        subdomain=host_key(row["subdomain"]) if row["subdomain"] else None,
        domains=hosts, plan=plan,
        upstream=row["upstream"] or (plan.upstream if plan is not None else None),
        settings=settings, trial_ends_ts=_epoch(row["trial_ends_at"]),
        status_changed_ts=_epoch(row["status_changed_at"]) or 0.0,
        dunning_days=_dunning_days(tenant_id, settings.get("dunning_days", DEFAULT_DUNNING_DAYS)),
        routes=_routes(tenant_id, settings.get("routes")),
        jwks_url=_str_or_none(settings.get("jwks_url")),
        jwks=_inline_jwks(tenant_id, settings.get("jwks")),
        jwt_issuer=_str_or_none(settings.get("jwt_issuer")),
        jwt_audience=_str_or_none(settings.get("jwt_audience")),
    )


def _key(record: RowMapping) -> KeyRecord:
    return KeyRecord(
        id=record["id"], tenant_id=record["tenant_id"], name=record["name"],
        mode=record["mode"], prefix=record["prefix"], scopes=frozenset(record["scopes"]),
        expires_ts=_epoch(record["expires_at"]),
    )


def _epoch(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive datetimes; the store writes UTC
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _zone(tenant_id: str, name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):  # ValueError: a malformed key like "../x"
        log.warning("tenant %s has unknown timezone %r; using UTC", tenant_id, name)
        return ZoneInfo("UTC")


def _dunning_days(tenant_id: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    log.warning("tenant %s has invalid dunning_days %r; using %d", tenant_id, value,
                DEFAULT_DUNNING_DAYS)
    return DEFAULT_DUNNING_DAYS


def _routes(tenant_id: str, value: Any) -> tuple[RouteRule, ...]:
    """A rule whose scopes are unreadable guards its prefix with a scope no key can hold
    (only `*` passes): a typo must not open the route it was meant to close."""
    if value is None:
        return ()
    rules: list[RouteRule] = []
    for item in value if isinstance(value, list) else [value]:
        prefix = item.get("prefix") if isinstance(item, dict) else None
        scopes = item.get("scopes") if isinstance(item, dict) else None
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            log.warning("tenant %s: ignoring route rule without a /prefix: %r", tenant_id, item)
            continue
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            log.warning("tenant %s: route rule %r has unreadable scopes; closing %s",
                        tenant_id, item, prefix)
            scopes = [MISCONFIGURED_SCOPE]
        rules.append(RouteRule(prefix.rstrip("/") or "/", tuple(sorted(set(scopes)))))
    return tuple(rules)


def _inline_jwks(tenant_id: str, value: Any) -> Mapping[str, PyJWK] | None:
    if value is None:
        return None
    try:
        return parse_jwks(value)
    except ValueError as exc:
        log.warning("tenant %s: ignoring unusable inline jwks: %s", tenant_id, exc)
        return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
