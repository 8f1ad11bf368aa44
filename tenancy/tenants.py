"""Tenants: onboarding, lookup, search, lifecycle moves, plan changes and edits.

Every write validates its whole input before the transaction, then writes the rows and the
audit event together, so a refused request leaves neither. Lists page with an opaque keyset
cursor over (created_at, id): a deep page costs the same as the first, where OFFSET would
scan everything before it.
"""

from __future__ import annotations

import base64
import enum
import re
import unicodedata
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Connection,
    RowMapping,
    bindparam,
    delete,
    func,
    insert,
    literal,
    literal_column,
    select,
    tuple_,
)
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError

from tenancy import keys, lifecycle, plans
from tenancy.controlplane import ControlPlane, Tx
from tenancy.ids import new_tenant_id
from tenancy.problems import conflict, invalid, not_found
from tenancy.settings import Settings
from tenancy.tables import domains as domain_rows
from tenancy.tables import tenants

RESERVED_SUBDOMAINS = frozenset(
    (
        "www", "admin", "api", "app", "apps", "auth", "login", "logout", "sso", "oauth",
        "mail", "email", "smtp", "imap", "pop", "ftp", "ns1", "ns2", "dns", "mx", "static",
        "assets", "cdn", "media", "status", "docs", "help", "support", "billing", "dashboard",
        "console", "portal", "blog", "dev", "staging", "test", "internal", "metrics", "health",
        "localhost", "root", "system", "tollway"
    )
)
LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
LOCALE_RE = re.compile(
    r"^(?P<lang>[a-z]{2,3})(?:-(?P<script>[a-z]{4}))?(?:-(?P<region>[a-z]{2}|[0-9]{3}))?"
    r"(?P<variants>(?:-(?:[a-z0-9]{5,8}|[0-9][a-z0-9]{3}))*)$",
    re.IGNORECASE,
)
FEATURE_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
MAX_METADATA_BYTES = 16 * 1024
MAX_SETTINGS_BYTES = 32 * 1024
MAX_JSON_DEPTH = 8
MAX_DOMAINS = 20
MAX_LIMIT = 500
ID_ATTEMPTS = 5


class _Unset(enum.Enum):
    UNSET = "unset"


UNSET = _Unset.UNSET
"""Marks an optional argument of `update` that was not given (None clears the value)."""


# --- validation ------------------------------------------------------------------------


def check_name(value: object) -> str:
    if not isinstance(value, str):
        raise invalid("name must be a string", "name")
    name = value.strip()
    if not 3 <= len(name) <= 100:
        raise invalid("name must be 3 to 100 characters", "name")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise invalid("name must not contain control characters", "name")
    return name


def check_email(value: object) -> str:
    if not isinstance(value, str) or len(value) > 254:
        raise invalid("email must be an address of at most 254 characters", "email")
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise invalid(f"email {value!r} is not valid: {exc}", "email") from None


def check_region(settings: Settings, value: str | None) -> str:
    region = settings.default_region if value is None else value
    if region not in settings.regions:
        raise invalid(f"region {region!r} is not one of {list(settings.regions)}", "region")
    return region


def check_locale(value: object) -> str:
    """A BCP 47 language tag (language, script, region, variants), canonically cased."""
    match = LOCALE_RE.fullmatch(value) if isinstance(value, str) and len(value) <= 35 else None
    if match is None:
        raise invalid(f"locale {value!r} is not a BCP 47 tag such as 'en-US'", "locale")
    parts = [match["lang"].lower()]
    if match["script"]:
        parts.append(match["script"].title())
    if match["region"]:
        parts.append(match["region"].upper())
    return "-".join(parts) + match["variants"].lower()


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def check_timezone(value: object) -> str:
    if not isinstance(value, str) or value not in _zones():
        raise invalid(f"timezone {value!r} is not an IANA zone such as 'Europe/Paris'", "timezone")
    return value


def check_currency(value: object) -> str:
    code = value.upper() if isinstance(value, str) else value
    if code not in plans.CURRENCIES:
        raise invalid(f"currency {value!r} is not an ISO 4217 code", "currency")
    return str(code)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def check_object(value: object, field: str, max_bytes: int) -> dict[str, Any]:
    """A JSON object of bounded size and depth; None means empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{field} must be a JSON object", field)
    try:
        size = len(orjson.dumps(value))
    except TypeError:
        raise invalid(f"{field} must hold only JSON values with string keys", field) from None
    if size > max_bytes:
        raise invalid(f"{field} is {size} bytes; the limit is {max_bytes}", field)
    if _depth(value) > MAX_JSON_DEPTH:
        raise invalid(f"{field} nests deeper than {MAX_JSON_DEPTH} levels", field)
    return value


def check_settings(value: object) -> dict[str, Any]:
    """Tenant settings: `branding` and `features` for the product, and the gateway's per-tenant
    knobs (`routes`, `dunning_days`, `jwks_url`, `jwks`, `jwt_issuer`, `jwt_audience`).
    They are checked here, at the boundary, so a replica never loads a setting it must guess at.
    """
    doc = check_object(value, "settings", MAX_SETTINGS_BYTES)
    unknown = sorted(set(doc) - SETTINGS_KEYS)
    if unknown:
        raise invalid(
            f"unknown settings {unknown}; allowed: {', '.join(sorted(SETTINGS_KEYS))}", "settings"
        )
    branding = doc.get("branding", {})
    if not isinstance(branding, dict) or not all(
        isinstance(v, str) and len(v) <= 2048 for v in branding.values()
    ):
        raise invalid("settings.branding must map names to strings", "settings.branding")
    features = doc.get("features", {})
    if not isinstance(features, dict) or not all(
        FEATURE_RE.fullmatch(k) and isinstance(v, bool) for k, v in features.items()
    ):
        raise invalid(
            "settings.features must map lower-case flag names to true or false",
            "settings.features",
        )
    _check_gateway_settings(doc)
    return doc


SETTINGS_KEYS = frozenset(
    {"branding", "features", "routes", "dunning_days", "jwks_url", "jwks", "jwt_issuer",
     "jwt_audience"}
)


def _check_gateway_settings(doc: dict[str, Any]) -> None:
    routes = doc.get("routes", [])
    if not isinstance(routes, list) or len(routes) > 100:
        raise invalid("settings.routes must be a list of at most 100 rules", "settings.routes")
    for i, rule in enumerate(routes):
        field = f"settings.routes[{i}]"
        if not isinstance(rule, dict) or set(rule) != {"prefix", "scopes"}:
            raise invalid(f"{field} must be an object with prefix and scopes", field)
        prefix, scopes = rule["prefix"], rule["scopes"]
        if not isinstance(prefix, str) or not prefix.startswith("/") or len(prefix) > 200:
            raise invalid(f"{field}.prefix must be a path starting with '/'", field)
        if not isinstance(scopes, list):
            raise invalid(f"{field}.scopes must be a list of scopes", field)
        keys.check_scopes(scopes)
    dunning = doc.get("dunning_days", 7)
    if not isinstance(dunning, int) or isinstance(dunning, bool) or not 0 <= dunning <= 90:
        raise invalid("settings.dunning_days must be an integer from 0 to 90",
                      "settings.dunning_days")
    url = doc.get("jwks_url")
    if url is not None and (
        not isinstance(url, str) or not url.startswith(("https://", "http://")) or len(url) > 2048
    ):
        raise invalid("settings.jwks_url must be an http(s) URL", "settings.jwks_url")
    jwks = doc.get("jwks")
    if jwks is not None and not (isinstance(jwks, dict) and isinstance(jwks.get("keys"), list)):
        raise invalid("settings.jwks must be a JWK Set object with a keys list", "settings.jwks")
    for name in ("jwt_issuer", "jwt_audience"):
        claim = doc.get(name)
        if claim is not None and (not isinstance(claim, str) or not 0 < len(claim) <= 512):
            raise invalid(f"settings.{name} must be a non-empty string", f"settings.{name}")


def check_subdomain(value: object) -> str:
    label = value.strip().lower() if isinstance(value, str) else ""
    if not LABEL_RE.fullmatch(label):
        raise invalid(
            f"subdomain {value!r} must be a DNS label: 1-63 letters, digits or '-', "
            "not starting or ending with '-'", "subdomain",
        )
    if label in RESERVED_SUBDOMAINS:
        raise invalid(f"subdomain {label!r} is reserved", "subdomain")
    return label


def check_domain(value: object, base_domains: Iterable[str]) -> str:
    host = value.strip().lower().removesuffix(".") if isinstance(value, str) else ""
    labels = host.split(".")
    if (
        not 3 <= len(host) <= 253
        or len(labels) < 2
        or not all(LABEL_RE.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise invalid(f"domain {value!r} is not a valid host name", "domains")
    for base in base_domains:
        if host == base or host.endswith("." + base):
            raise invalid(
                f"domain {host!r} is under the platform's base domain {base!r}; "
                "use a subdomain instead", "domains",
            )
    return host


def check_domains(values: Iterable[str], base_domains: Iterable[str]) -> list[str]:
    if isinstance(values, str):
        raise invalid("domains must be a list of host names", "domains")
    hosts = sorted({check_domain(v, base_domains) for v in values})
    if len(hosts) > MAX_DOMAINS:
        raise invalid(f"at most {MAX_DOMAINS} custom domains per tenant", "domains")
    return hosts


def _utc(when: datetime | None) -> datetime:
    if when is None:
        return datetime.now(UTC)
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _aware(when: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return None if when is None else _utc(when)


# --- reads -----------------------------------------------------------------------------


def _public(row: Mapping[Any, Any], hosts: list[str]) -> dict[str, Any]:
    # str(k): SQLAlchemy hands back quoted_name keys, a str subclass JSON encoders refuse.
    out = {str(k): (_utc(v).isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}
    out["domains"] = hosts
    return out


def _row(conn: Connection, tenant_id: str, *, lock: bool = False) -> RowMapping:
    query = select(tenants).where(tenants.c.id == tenant_id)
    row = conn.execute(query.with_for_update() if lock else query).mappings().first()
    if row is None:
        raise not_found("tenant", tenant_id)
    return row


def _hosts(conn: Connection, tenant_id: str) -> list[str]:
    query = select(domain_rows.c.domain).where(domain_rows.c.tenant_id == tenant_id)
    return sorted(conn.execute(query).scalars())


def get(conn: Connection, tenant_id: str) -> dict[str, Any]:
    return _public(_row(conn, tenant_id), _hosts(conn, tenant_id))


def _search_text() -> ColumnElement[str]:
    """The expression the pg_trgm index of migration 0002 covers; keep the two identical."""
    space: ColumnElement[str] = literal_column("' '")
    return func.lower(tenants.c.name + space + tenants.c.id + space + tenants.c.email)


def _encode_cursor(row: Mapping[Any, Any]) -> str:
    raw = orjson.dumps([_utc(row["created_at"]).isoformat(), row["id"]])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, tenant_id = orjson.loads(raw)
        return _utc(datetime.fromisoformat(created)), str(tenant_id)
    except (ValueError, TypeError):
        raise invalid("cursor is not one this API returned", "cursor") from None


def list_tenants(
    conn: Connection,
    *,
    q: str | None = None,
    status: str | None = None,
    plan: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first; `q` matches name, id or email case-insensitively."""
    if not 1 <= limit <= MAX_LIMIT:
        raise invalid(f"limit must be from 1 to {MAX_LIMIT}", "limit")
    query = select(tenants).order_by(tenants.c.created_at.desc(), tenants.c.id.desc())
    if status is not None:
        if status not in lifecycle.STATUSES:
            raise invalid(f"status must be one of {list(lifecycle.STATUSES)}", "status")
        query = query.where(tenants.c.status == status)
    if plan is not None:
        query = query.where(tenants.c.plan_id == plan)
    if q:
        if not 3 <= len(q) <= 100:
            # Trigrams need three characters; a shorter term would read every row.
            raise invalid("q must be 3 to 100 characters", "q")
        escaped = q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        # Inlined (safely quoted) so PostgreSQL plans with the real pattern: with a bound
        # parameter a cached generic plan walks created_at backwards and filters every row
        # for a rare term instead of asking the trigram index.
        pattern: BindParameter[str] = bindparam("q", f"%{escaped}%", literal_execute=True)
        query = query.where(_search_text().like(pattern, escape="\\"))
    if cursor:
        created, last_id = _decode_cursor(cursor)
        query = query.where(
            tuple_(tenants.c.created_at, tenants.c.id)
            < tuple_(
                literal(created, tenants.c.created_at.type), literal(last_id, tenants.c.id.type)
            )
        )
    # The limit is inlined too: a generic plan that sees `LIMIT $n` expects a tiny result and
    # again prefers the backward created_at scan over the trigram index.
    rows = list(conn.execute(query.limit(literal_column(str(int(limit) + 1)))).mappings())
    page = rows[:limit]
    hosts: dict[str, list[str]] = {row["id"]: [] for row in page}
    if page:
        found = conn.execute(
            select(domain_rows.c.tenant_id, domain_rows.c.domain)
            .where(domain_rows.c.tenant_id.in_(list(hosts)))
            .order_by(domain_rows.c.domain)
        )
        for tenant_id, host in found:
            hosts[tenant_id].append(host)
    items = [_public(row, hosts[row["id"]]) for row in page]
    return items, (_encode_cursor(page[-1]) if len(rows) > limit else None)


# --- writes ----------------------------------------------------------------------------


def _free_id(conn: Connection, name: str) -> str:
    for _ in range(ID_ATTEMPTS):
        candidate = new_tenant_id(name)
        if conn.execute(select(tenants.c.id).where(tenants.c.id == candidate)).first() is None:
            return candidate
    raise conflict("could not find a free tenant id; try again")


def _claim_subdomain(conn: Connection, label: str | None, tenant_id: str) -> None:
    if label is None:
        return
    owner = conn.execute(
        select(tenants.c.id).where(tenants.c.subdomain == label, tenants.c.id != tenant_id)
    ).scalar()
    if owner is not None:
        raise conflict(f"subdomain {label!r} is taken by another tenant", field="subdomain")


def _claim_domains(conn: Connection, hosts: list[str], tenant_id: str) -> None:
    if not hosts:
        return
    taken = conn.execute(
        select(domain_rows.c.domain).where(
            domain_rows.c.domain.in_(hosts), domain_rows.c.tenant_id != tenant_id
        )
    ).scalars().first()
    if taken is not None:
        raise conflict(f"domain {taken!r} belongs to another tenant", field="domains")
    conn.execute(insert(domain_rows), [{"domain": h, "tenant_id": tenant_id} for h in hosts])


@dataclass(frozen=True)
class NewTenant:
    """A validated onboarding request: checked before any transaction opens."""

    fields: dict[str, Any]
    hosts: list[str]
    plan_id: str


def new_tenant(
    config: Settings,
    /,
    *,
    name: str,
    email: str,
    plan: str | None = None,
    region: str | None = None,
    locale: str = "en-US",
    timezone: str = "UTC",
    currency: str = "USD",
    metadata: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    subdomain: str | None = None,
    domains: Iterable[str] = (),
    upstream: str | None = None,
) -> NewTenant:
    """The keywords are `create`'s; `config` is the platform's settings, `settings` the
    tenant's."""
    fields = {
        "name": check_name(name),
        "email": check_email(email),
        "region": check_region(config, region),
        "locale": check_locale(locale),
        "timezone": check_timezone(timezone),
        "currency": check_currency(currency),
        "metadata": check_object(metadata, "metadata", MAX_METADATA_BYTES),
        "settings": check_settings(settings),
        "subdomain": None if subdomain is None else check_subdomain(subdomain),
        "upstream": None if upstream is None else plans.check_upstream(upstream, "upstream"),
    }
    hosts = check_domains(domains, config.base_domains)
    return NewTenant(fields, hosts, plan or config.default_plan)


def create(
    cp: ControlPlane,
    *,
    actor: str,
    name: str,
    email: str,
    plan: str | None = None,
    region: str | None = None,
    locale: str = "en-US",
    timezone: str = "UTC",
    currency: str = "USD",
    metadata: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    subdomain: str | None = None,
    domains: Iterable[str] = (),
    upstream: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Onboard a tenant on the latest version of its plan, in trial if the plan has one."""
    new = new_tenant(
        cp.settings, name=name, email=email, plan=plan, region=region, locale=locale,
        timezone=timezone, currency=currency, metadata=metadata, settings=settings,
        subdomain=subdomain, domains=domains, upstream=upstream,
    )
    at = _utc(now)
    for attempt in range(ID_ATTEMPTS):
        try:
            with cp.transaction(actor) as tx:
                return create_in(tx, new, at)
        except IntegrityError:
            # A concurrent writer took the id, subdomain or a domain after our checks; the
            # next attempt's checks name the conflict, or pick a fresh id.
            if attempt == ID_ATTEMPTS - 1:
                raise conflict("the tenant conflicts with a concurrent change; retry") from None
    raise AssertionError("unreachable")


def create_in(tx: Tx, new: NewTenant, now: datetime) -> dict[str, Any]:
    """Write the tenant, its audit event and its domains inside the caller's transaction."""
    conn, fields, hosts = tx.conn, new.fields, new.hosts
    plan = plans.require(conn, new.plan_id)
    tenant_id = _free_id(conn, fields["name"])
    _claim_subdomain(conn, fields["subdomain"], tenant_id)
    state = lifecycle.initial(plan.trial_days, now)
    row = {
        "id": tenant_id,
        **fields,
        "plan_id": plan.plan_id,
        "plan_version": plan.version,
        "status": state.status,
        "trial_ends_at": state.trial_ends_at,
        "grace_ends_at": None,
        "status_changed_at": now,
        "created_at": now,
        "updated_at": now,
    }
    # Rows as parameters, not .values(): no per-call statement building or cache keying.
    conn.execute(insert(tenants), row)
    public = _public(row, hosts)
    tx.audit("tenant.created", tenant_id, tenant_id=tenant_id, after=public)
    # Domains go in last: a domain taken by another tenant rolls back the tenant row and
    # its audit event with it.
    _claim_domains(conn, hosts, tenant_id)
    return public


def transition(
    cp: ControlPlane,
    tenant_id: str,
    action: str,
    *,
    actor: str,
    now: datetime | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """Move a tenant along its lifecycle (see tenancy.lifecycle.TRANSITIONS)."""
    if reason is not None and len(reason) > 500:
        raise invalid("reason must be at most 500 characters", "reason")
    at = _utc(now)
    with cp.transaction(actor) as tx:
        row = _row(tx.conn, tenant_id, lock=True)
        state = lifecycle.State(
            row["status"], _aware(row["trial_ends_at"]), _aware(row["grace_ends_at"])
        )
        change = lifecycle.transition(state, action, now=at, grace_days=cp.settings.grace_days)
        values: dict[str, Any] = {
            "status": change.after.status,
            "trial_ends_at": change.after.trial_ends_at,
            "grace_ends_at": change.after.grace_ends_at,
            "status_changed_at": at,
            "updated_at": at,
        }
        if change.after.status == "deleted":
            # A deleted tenant keeps its row for the audit trail but frees its names.
            values["subdomain"] = None
            tx.conn.execute(delete(domain_rows).where(domain_rows.c.tenant_id == tenant_id))
        done = tx.conn.execute(
            sql_update(tenants)
            .where(tenants.c.id == tenant_id, tenants.c.status == state.status)
            .values(**values)
        )
        if done.rowcount != 1:
            raise conflict("the tenant changed concurrently; retry", tenant_status=state.status)
        tx.audit(
            change.event, tenant_id, tenant_id=tenant_id,
            before={"status": state.status},
            after={
                "status": change.after.status,
                "action": action,
                "reason": reason,
                "trial_ends_at": change.after.trial_ends_at,
                "grace_ends_at": change.after.grace_ends_at,
            },
        )
        return get(tx.conn, tenant_id)


def _move_plan(tx: Tx, row: RowMapping, plan: plans.Plan, now: datetime) -> bool:
    if (row["plan_id"], row["plan_version"]) == (plan.plan_id, plan.version):
        return False
    tx.conn.execute(
        sql_update(tenants)
        .where(tenants.c.id == row["id"])
        .values(plan_id=plan.plan_id, plan_version=plan.version, updated_at=now)
    )
    tx.audit(
        "tenant.plan_changed", row["id"], tenant_id=row["id"],
        before={"plan_id": row["plan_id"], "plan_version": row["plan_version"]},
        after={"plan_id": plan.plan_id, "plan_version": plan.version},
    )
    return True


def change_plan(
    cp: ControlPlane, tenant_id: str, plan_id: str, *, actor: str, version: int | None = None
) -> dict[str, Any]:
    """Put a tenant on a plan version (the latest by default); a no-op if already there."""
    with cp.transaction(actor) as tx:
        row = _row(tx.conn, tenant_id, lock=True)
        if row["status"] in ("deprovisioning", "deleted"):
            raise conflict(f"cannot change the plan of a tenant that is {row['status']}")
        _move_plan(tx, row, plans.require(tx.conn, plan_id, version), _utc(None))
        return get(tx.conn, tenant_id)


def migrate_to_latest(cp: ControlPlane, plan_id: str, *, actor: str) -> int:
    """Move every live tenant on an older version of `plan_id` to its latest version."""
    now = _utc(None)
    with cp.transaction(actor) as tx:
        plan = plans.load(tx.conn, plan_id)
        rows = tx.conn.execute(
            select(tenants)
            .where(
                tenants.c.plan_id == plan_id,
                tenants.c.plan_version < plan.version,
                tenants.c.status.not_in(("deprovisioning", "deleted")),
            )
            .order_by(tenants.c.id)
            .with_for_update()
        ).mappings()
        return sum(_move_plan(tx, row, plan, now) for row in list(rows))


def update(
    cp: ControlPlane,
    tenant_id: str,
    *,
    actor: str,
    name: str | None = None,
    email: str | None = None,
    locale: str | None = None,
    timezone: str | None = None,
    metadata: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    subdomain: str | _Unset | None = UNSET,
    domains: Iterable[str] | None = None,
    upstream: str | _Unset | None = UNSET,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Change the given fields; None leaves a field alone, except for subdomain and upstream
    where None clears it. `domains` replaces the whole set."""
    wanted: dict[str, Any] = {}
    if name is not None:
        wanted["name"] = check_name(name)
    if email is not None:
        wanted["email"] = check_email(email)
    if locale is not None:
        wanted["locale"] = check_locale(locale)
    if timezone is not None:
        wanted["timezone"] = check_timezone(timezone)
    if metadata is not None:
        wanted["metadata"] = check_object(metadata, "metadata", MAX_METADATA_BYTES)
    if subdomain is not UNSET:
        wanted["subdomain"] = None if subdomain is None else check_subdomain(subdomain)
    if upstream is not UNSET:
        wanted["upstream"] = (
            None if upstream is None else plans.check_upstream(upstream, "upstream")
        )
    new_settings = None if settings is None else check_settings(settings)
    new_hosts = None if domains is None else check_domains(domains, cp.settings.base_domains)
    at = _utc(now)
    try:
        with cp.transaction(actor) as tx:
            _apply_update(tx, tenant_id, wanted, new_settings, new_hosts, at)
            return get(tx.conn, tenant_id)
    except IntegrityError:
        raise conflict("the change conflicts with a concurrent change; retry") from None


def _apply_update(
    tx: Tx,
    tenant_id: str,
    wanted: dict[str, Any],
    new_settings: dict[str, Any] | None,
    new_hosts: list[str] | None,
    now: datetime,
) -> None:
    conn = tx.conn
    row = _row(conn, tenant_id, lock=True)
    if row["status"] == "deleted":
        raise conflict("a deleted tenant cannot be changed")
    before = {k: row[k] for k, v in wanted.items() if row[k] != v}
    after = {k: wanted[k] for k in before}
    if "subdomain" in after:
        _claim_subdomain(conn, after["subdomain"], tenant_id)
    if new_hosts is not None:
        old_hosts = _hosts(conn, tenant_id)
        if old_hosts != new_hosts:
            before["domains"], after["domains"] = old_hosts, new_hosts
            conn.execute(
                delete(domain_rows).where(
                    domain_rows.c.tenant_id == tenant_id, domain_rows.c.domain.not_in(new_hosts)
                )
            )
            _claim_domains(conn, sorted(set(new_hosts) - set(old_hosts)), tenant_id)
    settings_changed = new_settings is not None and new_settings != row["settings"]
    columns = {k: v for k, v in after.items() if k != "domains"}
    if settings_changed:
        columns["settings"] = new_settings
    if not columns and not before:
        return
    conn.execute(
        sql_update(tenants).where(tenants.c.id == tenant_id).values(updated_at=now, **columns)
    )
    if before:
        tx.audit(
            "tenant.updated", tenant_id, tenant_id=tenant_id, before=before, after=after
        )
    if settings_changed:
        tx.audit(
            "tenant.settings_changed", tenant_id, tenant_id=tenant_id,
            before={"settings": row["settings"]}, after={"settings": new_settings},
        )
