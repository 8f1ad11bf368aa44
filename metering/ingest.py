"""Usage reported by apps as CloudEvents: validate, deduplicate, store.

Deduplication is decided by one `SET NX EX` per event on (tenant, source, id), so the
decision and the 35-day memory of it are one atomic step; a batch does all of them in one
pipelined round trip. Accepted events go straight to ClickHouse (source = 'api') rather
than through the usage stream: the caller gets an answer only once the rows are stored, and
the insert carries a deduplication token derived from the events, so a retried insert is a
no-op in the raw table and the rollups. If the insert fails the dedup keys are released so
the app's retry is accepted, not reported as a duplicate of something never stored.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from clickhouse_connect.driver.client import Client
from redis.asyncio import Redis

from metering import clickhouse
from metering.events import MAX_DIM_LEN, MAX_DIMS, UsageEvent
from metering.meters import Meter
from metering.schema import RAW_COLUMNS, RAW_TABLE, insert_settings

MAX_AGE = timedelta(days=35)
MAX_AHEAD = timedelta(minutes=5)
# a key must outlive the last moment its event could still pass the age check
DEDUP_TTL_S = int((MAX_AGE + MAX_AHEAD).total_seconds()) + 60
MAX_ID_LEN = 256
MAX_SOURCE_LEN = 1024
MAX_UNITS = Decimal(10) ** 29  # Decimal(38, 9) keeps 29 integer digits
# event_id is a UUID column; a CloudEvent id is any string, so derive a stable UUID from it
_ID_NAMESPACE = uuid.UUID("5d0c3f1e-2b1a-4c5e-9f33-7a1f0e6c2d11")

Status = Literal["accepted", "duplicate", "rejected"]


class Rejected(ValueError):
    """A CloudEvent that can never be accepted; the message says why."""


@dataclass
class Outcome:
    index: int
    status: Status
    id: str | None = None
    reason: str | None = None
    event: UsageEvent | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "status": self.status}
        if self.id is not None:
            out["id"] = self.id
        if self.reason is not None:
            out["reason"] = self.reason
        return out


def dedup_key(tenant_id: str, source: str, event_id: str) -> str:
    digest = hashlib.sha1(f"{source}\x00{event_id}".encode(), usedforsecurity=False).hexdigest()
    return f"{{t:{tenant_id}}}:ce:{digest}"


def parse_cloudevent(
    doc: Any, meters: Mapping[str, Meter], tenant_id: str, now: datetime
) -> UsageEvent:
    """One CloudEvent (structured JSON mode) as a usage event, or `Rejected`."""
    if not isinstance(doc, dict):
        raise Rejected("an event must be a JSON object")
    if doc.get("specversion") != "1.0":
        raise Rejected("specversion must be '1.0'")
    ce_id, source = doc.get("id"), doc.get("source")
    if not isinstance(ce_id, str) or not 0 < len(ce_id) <= MAX_ID_LEN:
        raise Rejected(f"id must be a non-empty string of at most {MAX_ID_LEN} characters")
    if not isinstance(source, str) or not 0 < len(source) <= MAX_SOURCE_LEN:
        raise Rejected(f"source must be a non-empty string of at most {MAX_SOURCE_LEN} characters")
    kind = doc.get("type")
    meter = meters.get(kind) if isinstance(kind, str) else None
    if meter is None or not meter.ingestible:
        names = sorted(m.name for m in meters.values() if m.ingestible)
        raise Rejected(f"type must name a meter that accepts events: {names}")
    content_type = doc.get("datacontenttype", "application/json")
    media = content_type.split(";")[0].strip() if isinstance(content_type, str) else None
    if media != "application/json":
        raise Rejected("datacontenttype must be application/json")
    at = _time(doc.get("time"), now)
    subject = doc.get("subject", "")
    if not isinstance(subject, str) or len(subject) > MAX_ID_LEN:
        raise Rejected(f"subject must be a string of at most {MAX_ID_LEN} characters")
    data = doc.get("data")
    if not isinstance(data, dict):
        raise Rejected("data must be a JSON object with numeric units")
    return UsageEvent(
        tenant_id=tenant_id,
        meter=meter.name,
        subject=subject,
        time_ms=int(at.timestamp() * 1000),
        units=_units(data.get("units")),
        dims=_dims(data.get("dims")),
        event_id=str(uuid.uuid5(_ID_NAMESPACE, f"{tenant_id}\x00{source}\x00{ce_id}")),
    )


def to_row(event: UsageEvent, source: str) -> list[Any]:
    """A raw-table row in RAW_COLUMNS order."""
    return [
        uuid.UUID(event.event_id), event.tenant_id, event.meter, event.subject,
        datetime.fromtimestamp(event.time_ms / 1000, UTC), event.units, event.route,
        event.method, event.status, event.latency_ms, event.bytes_in, event.bytes_out,
        event.dims, source,
    ]


def insert_events(client: Client, events: Sequence[UsageEvent], source: str, token: str) -> None:
    client.insert(
        RAW_TABLE, [to_row(e, source) for e in events], column_names=list(RAW_COLUMNS),
        settings=insert_settings(token),
    )


async def ingest(
    redis: Redis, client: Client, meters: Mapping[str, Meter], tenant_id: str,
    docs: Sequence[Any], now: datetime,
) -> list[Outcome]:
    """Validate, deduplicate and store a batch; one outcome per input, in order."""
    outcomes: list[Outcome] = []
    for index, doc in enumerate(docs):
        ce_id = doc.get("id") if isinstance(doc, dict) else None
        shown = ce_id if isinstance(ce_id, str) and len(ce_id) <= MAX_ID_LEN else None
        try:
            event = parse_cloudevent(doc, meters, tenant_id, now)
        except Rejected as exc:
            outcomes.append(Outcome(index, "rejected", shown, str(exc)))
            continue
        key = dedup_key(tenant_id, doc["source"], doc["id"])
        outcomes.append(Outcome(index, "accepted", shown, event=event, key=key))
    fresh = [o for o in outcomes if o.status == "accepted"]
    if not fresh:
        return outcomes
    async with redis.pipeline(transaction=False) as pipe:
        for o in fresh:
            pipe.set(o.key, b"1", nx=True, ex=DEDUP_TTL_S)  # type: ignore[arg-type]
        won = await pipe.execute()
    for o, first in zip(fresh, won, strict=True):
        if not first:  # includes a repeat inside this batch: its earlier twin set the key
            o.status = "duplicate"
    stored = [o for o in fresh if o.status == "accepted"]
    if stored:
        events = [o.event for o in stored if o.event is not None]
        token = "api:" + hashlib.sha256(
            "".join(sorted(e.event_id for e in events)).encode()
        ).hexdigest()
        try:
            await clickhouse.run_blocking(insert_events, client, events, "api", token)
        except BaseException:
            await redis.delete(*[o.key for o in stored if o.key is not None])
            raise
    return outcomes


def _time(value: Any, now: datetime) -> datetime:
    if value is None:
        return now
    if not isinstance(value, str):
        raise Rejected("time must be an RFC 3339 timestamp")
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise Rejected("time must be an RFC 3339 timestamp") from None
    if at.tzinfo is None:
        raise Rejected("time must carry a UTC offset")
    if at < now - MAX_AGE:
        raise Rejected("time is more than 35 days in the past")
    if at > now + MAX_AHEAD:
        raise Rejected("time is more than 5 minutes in the future")
    return at


def _units(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise Rejected("data.units must be a number")
    try:
        units = Decimal(str(value))
    except InvalidOperation:
        raise Rejected("data.units must be a number") from None
    if not units.is_finite() or abs(units) >= MAX_UNITS:
        raise Rejected("data.units must be a finite number below 1e29")
    exponent = units.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -9:
        raise Rejected("data.units has more than 9 decimal places")
    return units


def _dims(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_DIMS:
        raise Rejected(f"data.dims must be an object of at most {MAX_DIMS} entries")
    for k, v in value.items():
        if not isinstance(v, str) or not k or len(k) > MAX_DIM_LEN or len(v) > MAX_DIM_LEN:
            raise Rejected(f"data.dims must map names to strings of at most {MAX_DIM_LEN} chars")
    return dict(value)
