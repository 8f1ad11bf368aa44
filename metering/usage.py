"""Usage per tenant and meter, read from the smallest rollup that answers the question exactly.

A rollup answers a query when every boundary the query needs (the range ends and the window
starts in the caller's timezone) falls on one of its bucket edges. Day buckets are UTC days,
so they serve only zones at UTC offset 0 over the whole range; whole-hour zones use hours,
half-hour zones minutes (when not grouping by a dimension, which minute rows do not keep),
and anything finer falls back to the raw table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from clickhouse_connect.driver.client import Client

from metering.meters import Aggregation, Meter
from metering.schema import COLUMN_DIMENSIONS, RAW_TABLE, ROLLUPS
from tenancy.problems import invalid

Window = Literal["minute", "hour", "day", "month"]
WINDOWS: tuple[Window, ...] = ("minute", "hour", "day", "month")
_STEP = {"minute": 60, "hour": 3600, "day": 86400}
# rollups a window may read, coarsest first
_CANDIDATES: dict[Window | None, tuple[str, ...]] = {
    None: ("day", "hour", "minute"),
    "month": ("day", "hour", "minute"),
    "day": ("day", "hour", "minute"),
    "hour": ("hour", "minute"),
    "minute": ("minute",),
}
_PERIOD = {
    "minute": "toStartOfMinute({c})",
    "hour": "toStartOfHour({c}, {{tz:String}})",
    "day": "toStartOfDay({c}, {{tz:String}})",
    "month": "toDateTime(toStartOfMonth({c}, {{tz:String}}), {{tz:String}})",
}


@dataclass(frozen=True)
class UsageRow:
    period_start: datetime
    dims: dict[str, str]
    value: Decimal


@dataclass(frozen=True)
class QuotaLine:
    meter: str
    used: Decimal
    limit: int
    percent: Decimal
    resets_at: datetime


@dataclass(frozen=True)
class ReportLine:
    meter: str
    current: Decimal
    previous: Decimal
    change: Decimal
    change_percent: Decimal | None


def zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise invalid(f"unknown IANA timezone {tz!r}", "tz") from None


def month_bounds(at: datetime, tz: str) -> tuple[datetime, datetime]:
    """The calendar month containing `at` in `tz`, as UTC instants [start, end)."""
    local = at.astimezone(zone(tz))
    start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    nxt = (start + timedelta(days=32)).replace(day=1)
    return start.astimezone(UTC), nxt.replace(tzinfo=zone(tz)).astimezone(UTC)


def previous_month(start: datetime, tz: str) -> tuple[datetime, datetime]:
    return month_bounds(start - timedelta(seconds=1), tz)


def pick_source(
    window: Window | None, tz: str, start: datetime, end: datetime, grouped: bool = False
) -> str:
    """The coarsest exact table; minute rows carry no dimensions, so grouping skips them."""
    offsets = _offsets(zone(tz), start, end) if window is not None else {0}
    for name in _CANDIDATES[window]:
        if grouped and name == "minute":
            continue
        step = _STEP[name]
        edges_align = _epoch(start) % step == 0 and _epoch(end) % step == 0
        if edges_align and all(o % step == 0 for o in offsets):
            return ROLLUPS[name]
    return RAW_TABLE


def usage(
    client: Client,
    meter: Meter,
    tenant_id: str,
    start: datetime,
    end: datetime,
    window: Window,
    tz: str = "UTC",
    group_by: Sequence[str] = (),
    source: str | None = None,
) -> list[UsageRow]:
    """The meter's value per window (starting in `tz`) and per declared dimension value."""
    if window not in WINDOWS:
        raise invalid(f"window must be one of {list(WINDOWS)}", "window")
    needs_dims = bool(group_by) or meter.dim_key is not None
    table = source or pick_source(window, tz, start, end, grouped=needs_dims)
    col = "time" if table == RAW_TABLE else "bucket"
    groups = [_dimension(meter, d, i) for i, d in enumerate(group_by)]
    period = _PERIOD[window].format(c=col)
    keys = ", ".join(["p", *(f"g{i}" for i in range(len(groups)))])
    select = ", ".join([f"toUnixTimestamp({period}) AS p", *(e for e, _ in groups)])
    sql = (
        f"SELECT {select}, {_value(meter, table)} AS v FROM {table} "  # noqa: S608 - names are ours
        f"WHERE {_where(col)} GROUP BY {keys} ORDER BY {keys}"
    )
    params = _params(meter, tenant_id, start, end) | {"tz": tz}
    for _, p in groups:
        params |= p
    local = zone(tz)
    return [
        UsageRow(
            period_start=datetime.fromtimestamp(row[0], local),
            dims={d: str(row[1 + i]) for i, d in enumerate(group_by)},
            value=_decimal(row[-1]),
        )
        for row in client.query(sql, parameters=params).result_rows
    ]


def total(
    client: Client, meter: Meter, tenant_id: str, start: datetime, end: datetime,
    source: str | None = None,
) -> Decimal:
    table = source or pick_source(None, "UTC", start, end, grouped=meter.dim_key is not None)
    col = "time" if table == RAW_TABLE else "bucket"
    sql = f"SELECT {_value(meter, table)} FROM {table} WHERE {_where(col)}"  # noqa: S608
    rows = client.query(sql, parameters=_params(meter, tenant_id, start, end)).result_rows
    return _decimal(rows[0][0]) if rows else Decimal(0)


def totals(
    client: Client, meters: Iterable[Meter], tenant_id: str, start: datetime, end: datetime
) -> dict[str, Decimal]:
    """Every meter's total for a billing period, e.g. for rating or a quota summary."""
    return {m.name: total(client, m, tenant_id, start, end) for m in meters}


def quota_summary(
    used: dict[str, Decimal], quotas: dict[str, int], resets_at: datetime
) -> list[QuotaLine]:
    """One line per quota'd meter; a zero limit reads as 100% used once anything is used."""
    lines = []
    for meter, limit in sorted(quotas.items()):
        amount = used.get(meter, Decimal(0))
        if limit > 0:
            percent = (amount * 100 / limit).quantize(Decimal("0.1"))
        else:
            percent = Decimal(100 if amount > 0 else 0)
        lines.append(QuotaLine(meter, amount, limit, percent, resets_at))
    return lines


def compare(current: dict[str, Decimal], previous: dict[str, Decimal]) -> list[ReportLine]:
    lines = []
    for meter in sorted(set(current) | set(previous)):
        now, before = current.get(meter, Decimal(0)), previous.get(meter, Decimal(0))
        change = now - before
        pct = (change * 100 / before).quantize(Decimal("0.1")) if before else None
        lines.append(ReportLine(meter, now, before, change, pct))
    return lines


def _value(meter: Meter, table: str) -> str:
    raw = table == RAW_TABLE
    agg = meter.aggregation
    if agg is Aggregation.COUNT:
        if raw:
            return "countIf(source != 'correction') + sumIf(units, source = 'correction')"
        return "countMerge(events) + sumMerge(correction_units)"
    if agg is Aggregation.SUM:
        column = {"units": "units_sum"}.get(meter.value, meter.value)
        return f"sum({meter.value})" if raw else f"sumMerge({column})"
    if agg is Aggregation.MAX:
        return "max(units)" if raw else "maxMerge(units_max)"
    if agg is Aggregation.LATEST:
        return "argMax(units, time)" if raw else "argMaxMerge(units_latest)"
    if meter.dim_key is not None:
        return "uniqExactIf(dims[{vk:String}], mapContains(dims, {vk:String}))"
    return "uniqExactIf(subject, source != 'correction')" if raw else "uniqExactMerge(subjects)"


def _dimension(meter: Meter, dim: str, i: int) -> tuple[str, dict[str, Any]]:
    if dim not in meter.dimensions:
        raise invalid(
            f"meter {meter.name!r} cannot be grouped by {dim!r}; it declares "
            f"{list(meter.dimensions)}", "group_by",
        )
    if dim in COLUMN_DIMENSIONS:
        return f"toString({dim}) AS g{i}", {}
    return f"dims[{{d{i}:String}}] AS g{i}", {f"d{i}": dim}


def _where(col: str) -> str:
    return (
        "tenant_id = {tenant:String} AND meter = {event:String} "
        f"AND {col} >= {{start:DateTime64(3, 'UTC')}} AND {col} < {{end:DateTime64(3, 'UTC')}}"
    )


def _params(meter: Meter, tenant_id: str, start: datetime, end: datetime) -> dict[str, Any]:
    params: dict[str, Any] = {
        "tenant": tenant_id, "event": meter.event, "start": as_utc(start), "end": as_utc(end),
    }
    if meter.dim_key is not None:
        params["vk"] = meter.dim_key
    return params


def as_utc(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise invalid("timestamps must carry a timezone")
    return at.astimezone(UTC)


def _epoch(at: datetime) -> int:
    seconds = as_utc(at).timestamp()
    return int(seconds) if seconds == int(seconds) else -1


def _offsets(tz: ZoneInfo, start: datetime, end: datetime) -> set[int]:
    """UTC offsets (seconds) seen in [start, end], sampled every 6 hours and at the end."""
    seen = set()
    at = as_utc(start)
    stop = as_utc(end)
    while at < stop:
        seen.add(int(at.astimezone(tz).utcoffset().total_seconds()))  # type: ignore[union-attr]
        at += timedelta(hours=6)
    seen.add(int(stop.astimezone(tz).utcoffset().total_seconds()))  # type: ignore[union-attr]
    return seen


def _decimal(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))
