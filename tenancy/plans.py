"""Plans: declarative documents in, immutable versions out.

A plan is never edited in place. Applying a document stores a new version only when the
canonical content (its digest) differs from the latest version, so applying the same file
any number of times is a no-op, and tenants stay on the version they signed up for until
they are moved explicitly. The gateway reads `Plan`, never the raw rows.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
import yaml
from sqlalchemy import Connection, RowMapping, func, insert, select
from sqlalchemy.exc import IntegrityError

from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem, conflict, invalid, not_found
from tenancy.tables import plans

DEFAULTS_FILE = Path(__file__).with_name("default_plans.toml")
PLAN_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
METER_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
INTERVALS = ("month", "year")
FAIL_MODES = ("open", "closed")
MAX_PRICE = Decimal("9999999999.99")

# ISO 4217 active codes; prices and tenants' billing currencies are checked against it.
CURRENCIES = frozenset(
    (
        "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD",
        "BDT", "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN",
        "BZD", "CAD", "CDF", "CHF", "CLP", "CNY", "COP", "CRC", "CUC", "CUP", "CVE", "CZK",
        "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL",
        "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS",
        "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW",
        "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL",
        "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MYR", "MZN",
        "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR",
        "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK",
        "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS",
        "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS",
        "VED", "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR",
        "ZMW", "ZWG"
    )
)

_PLAN_KEYS = frozenset(
    {"name", "price", "currency", "interval", "trial_days", "users", "storage_gb", "features",
     "upstream", "limits", "quotas"}
)
_LIMIT_KEYS = frozenset(
    {"rate_per_second", "burst", "concurrency", "fail_mode", "local_rate_per_second"}
)


@dataclass(frozen=True)
class Plan:
    plan_id: str
    version: int
    name: str
    price: Decimal | None
    currency: str
    interval: str
    trial_days: int
    rate_per_second: float
    burst: int
    concurrency: int
    fail_mode: Literal["open", "closed"]
    local_rate_per_second: float | None
    quotas: dict[str, int]
    users: int | None
    storage_gb: int | None
    features: tuple[str, ...]
    upstream: str | None

    @classmethod
    def from_row(cls, row: RowMapping) -> Plan:
        limits = row["limits"]
        price = row["price"]
        return cls(
            plan_id=row["plan_id"],
            version=row["version"],
            name=row["name"],
            price=None if price is None else Decimal(price).quantize(Decimal("0.01")),
            currency=row["currency"],
            interval=row["interval"],
            trial_days=row["trial_days"],
            rate_per_second=float(limits["rate_per_second"]),
            burst=int(limits["burst"]),
            concurrency=int(limits["concurrency"]),
            fail_mode=limits["fail_mode"],
            local_rate_per_second=limits.get("local_rate_per_second"),
            quotas={str(k): int(v) for k, v in row["quotas"].items()},
            users=limits.get("users"),
            storage_gb=limits.get("storage_gb"),
            features=tuple(row["features"]),
            upstream=row["upstream"],
        )


def is_http_url(value: object) -> bool:
    if not isinstance(value, str) or len(value) > 2048:
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def check_upstream(value: object, field: str) -> str:
    """An absolute http(s) URL; shared with tenant overrides."""
    if not is_http_url(value):
        raise invalid(f"{field} must be an absolute http(s) URL, got {value!r}", field)
    return str(value)


def load_document(source: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML plan file, chosen by its extension."""
    path = Path(source)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise invalid(f"plan file {path.name!r} must end in .toml, .yaml or .yml", "path")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise invalid(f"cannot read plan file {str(path)!r}: {exc.strerror}", "path") from exc
    try:
        if path.suffix == ".toml":
            doc: Any = tomllib.loads(raw.decode())
        else:
            doc = yaml.safe_load(raw)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise invalid(f"plan file {path.name!r} does not parse: {exc}", "path") from exc
    if not isinstance(doc, dict):
        raise invalid(f"plan file {path.name!r} must hold a table named 'plans'", "plans")
    return doc


def parse(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Validate a plan document strictly and return each plan's canonical content."""
    extra = set(doc) - {"plans"}
    if extra:
        raise invalid(f"unknown top-level keys {sorted(extra)}; expected only 'plans'", "plans")
    table = doc.get("plans")
    if not isinstance(table, Mapping) or not table:
        raise invalid("the document must define at least one plan under 'plans'", "plans")
    return {str(pid): _parse_plan(str(pid), spec) for pid, spec in table.items()}


def _parse_plan(pid: str, spec: Any) -> dict[str, Any]:
    where = f"plans.{pid}"
    if not PLAN_ID_RE.fullmatch(pid):
        raise invalid(
            f"plan id {pid!r} must be 1-40 lower-case letters, digits, '-' or '_', "
            "starting with a letter", where,
        )
    if not isinstance(spec, Mapping):
        raise invalid(f"plan {pid!r} must be a table", where)
    _no_unknown(pid, where, spec, _PLAN_KEYS)
    name = spec.get("name")
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 100:
        raise invalid(f"plan {pid!r}: name must be a string of 1-100 characters", f"{where}.name")
    currency = spec.get("currency", "USD")
    if currency not in CURRENCIES:
        raise invalid(
            f"plan {pid!r}: currency {currency!r} is not an ISO 4217 code", f"{where}.currency"
        )
    interval = spec.get("interval", "month")
    if interval not in INTERVALS:
        raise invalid(
            f"plan {pid!r}: interval must be one of {list(INTERVALS)}", f"{where}.interval"
        )
    features = spec.get("features", [])
    if not isinstance(features, list) or not all(
        isinstance(f, str) and METER_RE.fullmatch(f) for f in features
    ):
        raise invalid(
            f"plan {pid!r}: features must be a list of lower-case identifiers",
            f"{where}.features",
        )
    upstream = spec.get("upstream")
    if upstream is not None and not is_http_url(upstream):
        raise invalid(
            f"plan {pid!r}: upstream must be an absolute http(s) URL, got {upstream!r}",
            f"{where}.upstream",
        )
    return {
        "name": name.strip(),
        "price": _price(pid, where, spec.get("price")),
        "currency": currency,
        "interval": interval,
        "trial_days": _int(pid, f"{where}.trial_days", spec.get("trial_days", 14), 0, 365),
        "limits": _limits(pid, where, spec),
        "quotas": _quotas(pid, where, spec.get("quotas", {})),
        "features": sorted(set(features)),
        "upstream": upstream,
    }


def _limits(pid: str, where: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    limits = spec.get("limits")
    if not isinstance(limits, Mapping):
        raise invalid(
            f"plan {pid!r}: a [limits] table with rate_per_second, burst, concurrency and "
            "fail_mode is required", f"{where}.limits",
        )
    _no_unknown(pid, f"{where}.limits", limits, _LIMIT_KEYS)
    for key in ("rate_per_second", "burst", "concurrency", "fail_mode"):
        if key not in limits:
            raise invalid(f"plan {pid!r}: limits.{key} is required", f"{where}.limits.{key}")
    fail_mode = limits["fail_mode"]
    if fail_mode not in FAIL_MODES:
        raise invalid(
            f"plan {pid!r}: limits.fail_mode must be 'open' or 'closed'",
            f"{where}.limits.fail_mode",
        )
    local = limits.get("local_rate_per_second")
    if fail_mode == "open" and local is None:
        raise invalid(
            f"plan {pid!r}: fail_mode 'open' needs limits.local_rate_per_second, the bounded "
            "per-node rate used while Redis is unreachable",
            f"{where}.limits.local_rate_per_second",
        )
    if fail_mode == "closed" and local is not None:
        raise invalid(
            f"plan {pid!r}: limits.local_rate_per_second applies only to fail_mode 'open'",
            f"{where}.limits.local_rate_per_second",
        )
    users, storage = spec.get("users"), spec.get("storage_gb")
    return {
        "rate_per_second": _rate(pid, f"{where}.limits.rate_per_second", limits["rate_per_second"]),
        "burst": _int(pid, f"{where}.limits.burst", limits["burst"], 1),
        "concurrency": _int(pid, f"{where}.limits.concurrency", limits["concurrency"], 1),
        "fail_mode": fail_mode,
        "local_rate_per_second": (
            None if local is None else _rate(pid, f"{where}.limits.local_rate_per_second", local)
        ),
        "users": None if users is None else _int(pid, f"{where}.users", users, 1),
        "storage_gb": None if storage is None else _int(pid, f"{where}.storage_gb", storage, 0),
    }


def _quotas(pid: str, where: str, quotas: Any) -> dict[str, int]:
    if not isinstance(quotas, Mapping):
        raise invalid(f"plan {pid!r}: quotas must be a table of meter = monthly units", where)
    out = {}
    for meter, units in quotas.items():
        if not isinstance(meter, str) or not METER_RE.fullmatch(meter):
            raise invalid(
                f"plan {pid!r}: quota meter {meter!r} must be a lower-case identifier",
                f"{where}.quotas",
            )
        out[meter] = _int(pid, f"{where}.quotas.{meter}", units, 0)
    return dict(sorted(out.items()))


def _no_unknown(pid: str, where: str, spec: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise invalid(
            f"plan {pid!r}: unknown keys {unknown} in {where}; allowed: {sorted(allowed)}", where
        )


def _int(pid: str, field: str, value: Any, minimum: int, maximum: int = 2**53) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        bounds = f"of at least {minimum}" if maximum == 2**53 else f"from {minimum} to {maximum}"
        raise invalid(
            f"plan {pid!r}: {field.split('.', 2)[-1]} must be an integer {bounds}, got {value!r}",
            field,
        )
    return value


def _rate(pid: str, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1e9:
        raise invalid(
            f"plan {pid!r}: {field.split('.', 2)[-1]} must be a positive number, got {value!r}",
            field,
        )
    return float(value)


def _price(pid: str, where: str, value: Any) -> str | None:
    if value is None:
        return None
    field = f"{where}.price"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise invalid(f"plan {pid!r}: price must be a decimal amount, got {value!r}", field)
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise invalid(f"plan {pid!r}: price {value!r} is not a decimal amount", field) from None
    if not price.is_finite() or price < 0 or price > MAX_PRICE:
        raise invalid(f"plan {pid!r}: price must be between 0 and {MAX_PRICE}", field)
    if price != price.quantize(Decimal("0.01")):
        raise invalid(f"plan {pid!r}: price {value!r} has more than two decimal places", field)
    return str(price.quantize(Decimal("0.01")))


def digest(content: Mapping[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()


def apply(
    cp: ControlPlane, source: str | Path | Mapping[str, Any], actor: str
) -> list[dict[str, Any]]:
    """Store a new version of every plan whose content changed; all or nothing."""
    doc = source if isinstance(source, Mapping) else load_document(source)
    parsed = parse(doc)
    results = []
    try:
        with cp.transaction(actor) as tx:
            for pid, content in sorted(parsed.items()):
                results.append(_store(tx, pid, content))
    except IntegrityError as exc:
        raise conflict("plans were changed concurrently; apply again") from exc
    return results


def _store(tx: Any, pid: str, content: dict[str, Any]) -> dict[str, Any]:
    conn: Connection = tx.conn
    latest = conn.execute(
        select(plans.c.version, plans.c.digest)
        .where(plans.c.plan_id == pid)
        .order_by(plans.c.version.desc())
        .limit(1)
    ).first()
    content_digest = digest(content)
    if latest is not None and latest.digest == content_digest:
        return {"plan_id": pid, "version": latest.version, "created": False}
    version = 1 if latest is None else latest.version + 1
    price = content["price"]
    conn.execute(
        insert(plans).values(
            plan_id=pid,
            version=version,
            name=content["name"],
            price=None if price is None else Decimal(price),
            currency=content["currency"],
            interval=content["interval"],
            trial_days=content["trial_days"],
            limits=content["limits"],
            quotas=content["quotas"],
            features=content["features"],
            upstream=content["upstream"],
            digest=content_digest,
            created_at=datetime.now(UTC),
        )
    )
    tx.audit(
        "plan.version_created", pid,
        before=None if latest is None else {"version": latest.version},
        after={"version": version, **content},
    )
    return {"plan_id": pid, "version": version, "created": True}


def ensure_defaults(cp: ControlPlane, actor: str = "system") -> list[dict[str, Any]]:
    """Seed the bundled plans that do not exist yet; an operator's later versions win."""
    doc = load_document(DEFAULTS_FILE)
    with cp.engine.connect() as conn:
        existing = set(conn.execute(select(plans.c.plan_id).distinct()).scalars())
    missing = {pid: spec for pid, spec in doc["plans"].items() if pid not in existing}
    return apply(cp, {"plans": missing}, actor) if missing else []


def load(conn: Connection, plan_id: str, version: int | None = None) -> Plan:
    """One version of a plan, the latest when `version` is None."""
    query = select(plans).where(plans.c.plan_id == plan_id)
    if version is None:
        query = query.order_by(plans.c.version.desc()).limit(1)
    else:
        query = query.where(plans.c.version == version)
    row = conn.execute(query).mappings().first()
    if row is None:
        what = plan_id if version is None else f"{plan_id} v{version}"
        raise not_found("plan", what)
    return Plan.from_row(row)


def list_plans(conn: Connection, *, all_versions: bool = False) -> list[Plan]:
    """Latest versions by default; every version for the gateway's snapshot."""
    query = select(plans).order_by(plans.c.plan_id, plans.c.version)
    if not all_versions:
        latest = (
            select(plans.c.plan_id, func.max(plans.c.version).label("version"))
            .group_by(plans.c.plan_id)
            .subquery()
        )
        query = query.join(
            latest, (plans.c.plan_id == latest.c.plan_id) & (plans.c.version == latest.c.version)
        )
    return [Plan.from_row(row) for row in conn.execute(query).mappings()]


def require(conn: Connection, plan_id: str, version: int | None = None) -> Plan:
    """Like `load`, but an unknown plan named in a request is bad input (422), not 404."""
    try:
        return load(conn, plan_id, version)
    except Problem as exc:
        field = "plan" if version is None else "version"
        raise invalid(exc.detail, field) from None
