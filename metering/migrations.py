"""Apply metering/sql/NNNN_name.sql in order, once each, recording versions in ClickHouse.

The same statements run on chDB and on a server. `{raw_ttl_days}` is the only placeholder;
when the setting changes after the tables exist, the TTL is altered in place on each run.
"""

from __future__ import annotations

import re
from importlib import resources

from clickhouse_connect.driver.client import Client

from metering.schema import MIGRATIONS_TABLE, RAW_TABLE
from tenancy.settings import Settings

_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_TTL_TABLES = (RAW_TABLE, "usage_minute")


def migration_files() -> list[tuple[str, str]]:
    """(version, sql text) in version order."""
    found = []
    for entry in resources.files("metering.sql").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append((entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8")))
    return sorted(found)


def statements(sql: str) -> list[str]:
    """Split a migration file on `;` at line ends; our DDL never has `;` inside literals."""
    no_comments = "\n".join(
        line for line in sql.splitlines() if not line.lstrip().startswith("--")
    )
    return [s.strip() for s in re.split(r";\s*$", no_comments, flags=re.M) if s.strip()]


def migrate(client: Client, settings: Settings) -> list[str]:
    """Apply pending migrations; returns the versions applied by this call."""
    ttl_days = int(settings.raw_ttl_days)
    if ttl_days <= 0:
        raise ValueError("raw_ttl_days must be positive")
    client.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {row[0] for row in client.query("SELECT version FROM schema_migrations").result_rows}
    applied = []
    for version, sql in migration_files():
        if version in done:
            continue
        for statement in statements(sql.replace("{raw_ttl_days}", str(ttl_days))):
            client.command(statement)
        client.insert(MIGRATIONS_TABLE, [[version]], column_names=["version"])
        applied.append(version)
    _apply_ttl(client, ttl_days)
    return applied


_VIEW = re.compile(r"CREATE MATERIALIZED VIEW IF NOT EXISTS \w+ TO (\w+) AS\s+(SELECT\s.*)", re.S)


def rebuild_rollups(client: Client, month: int) -> list[str]:
    """Recompute every rollup's partition `month` (YYYYMM) from the raw events.

    The partition is dropped and refilled with the views' own SELECT, so a recompute replaces
    rollup rows instead of adding to them. Run it for closed months, or with ingestion paused:
    rows inserted between the DROP and the SELECT would be counted by both.
    """
    views = dict(migration_files())["0003_rollup_views"]
    rebuilt = []
    for statement in statements(views):
        match = _VIEW.match(statement)
        if match is None:
            continue
        table, select = match.groups()
        scoped = select.replace(
            "FROM usage_events", "FROM usage_events WHERE toYYYYMM(time) = {month:UInt32}"
        )
        client.command(f"ALTER TABLE {table} DROP PARTITION {{month:UInt32}}",
                       parameters={"month": month})
        client.command(f"INSERT INTO {table} {scoped}", parameters={"month": month})
        rebuilt.append(table)
    return rebuilt


def _apply_ttl(client: Client, ttl_days: int) -> None:
    """Only MergeTree-family tables hold a TTL. On a cluster `usage_events` is a Distributed
    table over `usage_events_local`, which ClickHouse refuses to alter this way; the local
    tables' TTL is changed ON CLUSTER by hand (docs/deployment.md)."""
    wanted = f"INTERVAL {ttl_days} DAY"
    for table in _TTL_TABLES:
        rows = client.query(
            "SELECT engine, engine_full FROM system.tables WHERE database = currentDatabase() "
            "AND name = {t:String}",
            parameters={"t": table},
        ).result_rows
        if not rows or not str(rows[0][0]).endswith("MergeTree"):
            continue
        engine = str(rows[0][1])
        if wanted not in engine and f"toIntervalDay({ttl_days})" not in engine:
            column = "toDateTime(time)" if table == RAW_TABLE else "bucket"
            client.command(f"ALTER TABLE {table} MODIFY TTL {column} + {wanted}")
