"""Names shared with the rest of Tollway: the raw table's column order and the rollup tables.

The Streams consumer inserts rows in `RAW_COLUMNS` order, so this tuple is a contract; the
DDL lives in metering/sql/.
"""

from __future__ import annotations

RAW_TABLE = "usage_events"
MIGRATIONS_TABLE = "schema_migrations"

RAW_COLUMNS: tuple[str, ...] = (
    "event_id",
    "tenant_id",
    "meter",
    "subject",
    "time",
    "units",
    "route",
    "method",
    "status",
    "latency_ms",
    "bytes_in",
    "bytes_out",
    "dims",
    "source",
)

# window -> rollup table whose bucket is that long (bucket is the UTC start of the interval)
ROLLUPS: dict[str, str] = {
    "minute": "usage_minute",
    "hour": "usage_hour",
    "day": "usage_day",
}

# columns a meter may group by directly; any other dimension name is a key of `dims`
COLUMN_DIMENSIONS = ("route", "method", "status")

# Insert settings for a block: the token makes a retried block a no-op in the raw table
# and, with the session's deduplicate_blocks_in_dependent_materialized_views, in the rollups.
def insert_settings(token: str) -> dict[str, str]:
    return {"insert_deduplication_token": token}
