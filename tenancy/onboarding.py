"""Bulk onboarding: many tenants, each with its first API key, one transaction per tenant.

A tenant, its custom domains, its first key and both audit events commit together, so a
refused entry leaves nothing and costs one commit instead of two. Every entry is validated
before any transaction opens, and subdomains and domains claimed twice within the import are
refused up front, the first claim winning, so the outcome does not depend on which worker
commits first. On PostgreSQL a small thread pool overlaps the commit waits; SQLite has a
single writer, so there the entries run one after another (benchmarks/RESULTS.md, "Control
plane", has the measurements behind both choices).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.exc import IntegrityError

from tenancy import keys, tenants
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem, conflict, invalid

SPEC_FIELDS = frozenset(
    {"name", "email", "plan", "region", "locale", "timezone", "currency", "metadata",
     "settings", "subdomain", "domains", "upstream"}
)
TEXT_FIELDS = frozenset(
    {"name", "email", "plan", "region", "locale", "timezone", "currency", "subdomain",
     "upstream"}
)
CSV_COLUMNS = frozenset(
    {"name", "email", "plan", "region", "locale", "timezone", "currency", "subdomain",
     "domain", "domains", "upstream"}
)
POSTGRES_WORKERS = 4
MAX_REPORTED_LINES = 20
_HOST_SEPARATORS = re.compile(r"[\s;]+")


@dataclass
class Outcome:
    """What became of one entry: the tenant and its key, or the problem that refused it."""

    index: int
    tenant: dict[str, Any] | None = None
    key: dict[str, Any] | None = None
    secret: str | None = None
    problem: Problem | None = None


@dataclass(frozen=True)
class _Checked:
    index: int
    tenant: tenants.NewTenant
    key: keys.NewKey | None


def onboard(
    cp: ControlPlane,
    specs: Sequence[Mapping[str, Any]],
    *,
    actor: str,
    with_keys: bool = True,
    workers: int | None = None,
    progress: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Create a tenant (and a key, `with_keys`) per entry; outcomes come back in entry order.

    An entry's keywords are `tenants.create`'s. `progress` is called in the caller's thread
    as each entry finishes, so it can persist a secret before the next one is reported. An
    error that is not a Problem (the store went away) stops the import; what committed
    before it stays committed and has been reported.
    """
    outcomes = [Outcome(index=i) for i in range(len(specs))]
    pending: list[_Checked] = []
    for outcome, spec in zip(outcomes, specs, strict=True):
        try:
            pending.append(_check(cp, outcome.index, spec, with_keys))
        except Problem as refused:
            outcome.problem = refused
    pending = _first_claims(pending, outcomes)
    for outcome in outcomes:
        if outcome.problem is not None and progress is not None:
            progress(outcome)
    if workers is None:
        workers = POSTGRES_WORKERS if cp.engine.dialect.name == "postgresql" else 1
    if workers <= 1:
        for entry in pending:
            _finish(outcomes[entry.index], _write(cp, actor, entry), progress)
        return outcomes
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="onboard") as pool:
        futures: dict[Future[Outcome], int] = {
            pool.submit(_write, cp, actor, entry): entry.index for entry in pending
        }
        error: BaseException | None = None
        for future in as_completed(futures):
            if future.cancelled():
                continue
            failed = future.exception()
            if failed is None:
                _finish(outcomes[futures[future]], future.result(), progress)
            elif error is None:
                # Stop starting entries, but report every one that still commits.
                error = failed
                for other in futures:
                    other.cancel()
    if error is not None:
        raise error
    return outcomes


def _finish(
    outcome: Outcome, written: Outcome, progress: Callable[[Outcome], None] | None
) -> None:
    outcome.tenant, outcome.key = written.tenant, written.key
    outcome.secret, outcome.problem = written.secret, written.problem
    if progress is not None:
        progress(outcome)


def _check(cp: ControlPlane, index: int, spec: Mapping[str, Any], with_keys: bool) -> _Checked:
    if not isinstance(spec, Mapping):
        raise invalid("an entry must be an object of tenant fields")
    unknown = sorted(set(spec) - SPEC_FIELDS)
    if unknown:
        raise invalid(
            f"unknown fields {unknown}; allowed: {', '.join(sorted(SPEC_FIELDS))}", unknown[0]
        )
    missing = [name for name in ("name", "email") if spec.get(name) is None]
    if missing:
        raise invalid(f"{missing[0]} is required", missing[0])
    # Entries come from files, where any JSON value can sit in any field: a number where the
    # store expects text must be a refusal of this entry, not a driver error ending the import.
    for name in sorted(TEXT_FIELDS & set(spec)):
        if spec[name] is not None and not isinstance(spec[name], str):
            raise invalid(f"{name} must be a string", name)
    hosts = spec.get("domains", ())
    if not isinstance(hosts, list | tuple) or not all(isinstance(h, str) for h in hosts):
        raise invalid("domains must be a list of host names", "domains")
    tenant = tenants.new_tenant(cp.settings, **spec)
    key = keys.new_key(cp.settings.key_environment, now=datetime.now(UTC)) if with_keys else None
    return _Checked(index, tenant, key)


def _first_claims(pending: list[_Checked], outcomes: list[Outcome]) -> list[_Checked]:
    """Refuse an entry that claims a subdomain or domain an earlier entry claims."""
    claimed: dict[tuple[str, str], int] = {}
    kept = []
    for entry in pending:
        subdomain = entry.tenant.fields["subdomain"]
        names = [("subdomain", subdomain)] if subdomain else []
        names += [("domains", host) for host in entry.tenant.hosts]
        clash = next((name for name in names if name in claimed), None)
        if clash is not None:
            field, value = clash
            outcomes[entry.index].problem = conflict(
                f"{field.removesuffix('s')} {value!r} is claimed by an earlier entry of this "
                "import", earlier_entry=claimed[clash],
                errors=[{"field": field, "message": "claimed by an earlier entry"}],
            )
            continue
        claimed.update(dict.fromkeys(names, entry.index))
        kept.append(entry)
    return kept


def _write(cp: ControlPlane, actor: str, entry: _Checked) -> Outcome:
    """One transaction: tenant row, domains, key and their audit events, or nothing."""
    for attempt in range(tenants.ID_ATTEMPTS):
        try:
            with cp.transaction(actor) as tx:
                now = datetime.now(UTC)
                tenant = tenants.create_in(tx, entry.tenant, now)
                if entry.key is None:
                    return Outcome(entry.index, tenant=tenant)
                record, secret = keys.create_in(
                    tx, tenant["id"], entry.key, now, tenant_is_new=True
                )
            return Outcome(entry.index, tenant=tenant, key=record, secret=secret)
        except Problem as exc:
            return Outcome(entry.index, problem=exc)
        except IntegrityError:
            # Someone outside this import took the id, subdomain or a domain after our
            # checks; the next attempt's checks name the conflict, or pick a fresh id.
            if attempt == tenants.ID_ATTEMPTS - 1:
                problem = conflict("the tenant conflicts with a concurrent change; retry")
                return Outcome(entry.index, problem=problem)
    raise AssertionError("unreachable")


# --- import files ----------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    line: int
    spec: dict[str, Any]


def read_file(path: Path, fmt: str | None = None) -> list[Entry]:
    """Entries of a JSON Lines or CSV file (by extension unless `fmt` says), each with the
    line it came from. A line that cannot be read refuses the whole file, before anything is
    written, naming every such line."""
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise invalid(f"cannot read {path}: {exc}", "file") from None
    entries, errors = (_read_csv if fmt == "csv" else _read_jsonl)(text)
    if errors:
        shown = errors[:MAX_REPORTED_LINES]
        more = f" (first {len(shown)} listed)" if len(errors) > len(shown) else ""
        raise Problem(
            422, f"{path}: {len(errors)} malformed line(s){more}; nothing was imported",
            kind="validation-error",
            errors=[{"field": f"line {line}", "message": msg} for line, msg in shown],
        )
    if not entries:
        raise invalid(f"{path} holds no tenants", "file")
    return entries


def _read_jsonl(text: str) -> tuple[list[Entry], list[tuple[int, str]]]:
    entries, errors = [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            errors.append((number, f"not JSON: {exc}"))
            continue
        if not isinstance(doc, dict):
            errors.append((number, "not a JSON object"))
            continue
        if "domain" in doc and isinstance(doc.get("domains", []), list):
            doc["domains"] = [*doc.get("domains", []), doc.pop("domain")]
        entries.append(Entry(number, doc))
    return entries, errors


def _read_csv(text: str) -> tuple[list[Entry], list[tuple[int, str]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [column.strip().lower() for column in next(reader)]
    except (StopIteration, csv.Error):
        return [], [(1, "no header row (name,email,plan[,subdomain,domain,upstream])")]
    unknown = sorted(set(header) - CSV_COLUMNS)
    if unknown or not {"name", "email"} <= set(header) or len(set(header)) < len(header):
        return [], [(1, f"the header must name distinct columns among "
                        f"{', '.join(sorted(CSV_COLUMNS))}, with name and email")]
    entries, errors = [], []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append((reader.line_num, str(exc)))
            continue
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            errors.append((reader.line_num, f"{len(row)} cells; the header has {len(header)}"))
            continue
        entries.append(Entry(reader.line_num, _csv_spec(header, row)))
    return entries, errors


def _csv_spec(header: list[str], row: list[str]) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for column, cell in zip(header, row, strict=True):
        value = cell.strip()
        if not value:
            continue
        if column in ("domain", "domains"):
            spec["domains"] = [*spec.get("domains", ()), *_hosts(value)]
        else:
            spec[column] = value
    return spec


def _hosts(cell: str) -> Iterable[str]:
    return (host for host in _HOST_SEPARATORS.split(cell) if host)
