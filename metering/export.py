"""One tenant's daily usage facts as CSV or Parquet, rendered by ClickHouse itself.

Finance reconciles against these files, so they hold the raw facts per day and grouping
(events, unit sums, bytes, distinct subjects) rather than derived meter values; a meter's
value is a function of these columns. ClickHouse's own FORMAT keeps Parquet free of a new
Python dependency and identical in chDB and server mode.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from clickhouse_connect.driver.client import Client

from metering.schema import RAW_TABLE
from metering.usage import as_utc, pick_source, zone

Format = Literal["csv", "parquet"]
FORMATS: dict[str, tuple[str, str]] = {
    "csv": ("CSVWithNames", "text/csv; charset=utf-8"),
    "parquet": ("Parquet", "application/vnd.apache.parquet"),
}
# column -> (expression on a rollup, expression on the raw table)
_COLUMNS = {
    "events": ("countMerge(events)", "countIf(source != 'correction')"),
    "correction_units": ("sumMerge(correction_units)", "sumIf(units, source = 'correction')"),
    "units": ("sumMerge(units_sum)", "sum(units)"),
    "units_max": ("maxMerge(units_max)", "max(units)"),
    "units_latest": ("argMaxMerge(units_latest)", "argMax(units, time)"),
    "bytes_in": ("sumMerge(bytes_in)", "sum(bytes_in)"),
    "bytes_out": ("sumMerge(bytes_out)", "sum(bytes_out)"),
    "subjects": ("uniqExactMerge(subjects)", "uniqExactIf(subject, source != 'correction')"),
}
_KEYS = "meter, day, route, method, status, dims"


def export_usage(
    client: Client, tenant_id: str, start: datetime, end: datetime, tz: str, fmt: Format
) -> bytes:
    """Rows per (meter, local day, route, method, status, dims) for [start, end)."""
    zone(tz)
    table = pick_source("day", tz, start, end, grouped=True)
    raw = table == RAW_TABLE
    col = "time" if raw else "bucket"
    values = ", ".join(f"{pair[1 if raw else 0]} AS {name}" for name, pair in _COLUMNS.items())
    sql = (
        f"SELECT meter, toDate({col}, {{tz:String}}) AS day, route, method, status, dims, "  # noqa: S608
        f"{values} FROM {table} WHERE tenant_id = {{tenant:String}} "
        f"AND {col} >= {{start:DateTime64(3, 'UTC')}} AND {col} < {{end:DateTime64(3, 'UTC')}} "
        f"GROUP BY {_KEYS} ORDER BY {_KEYS}"
    )
    params = {"tenant": tenant_id, "tz": tz, "start": as_utc(start), "end": as_utc(end)}
    return bytes(client.raw_query(sql, parameters=params, fmt=FORMATS[fmt][0]))
