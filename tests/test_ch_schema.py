"""The ClickHouse schema on real chDB: migrations, the raw-table contract, deduplication."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

from metering import clickhouse
from metering.events import UsageEvent
from metering.ingest import insert_events
from metering.migrations import migrate, rebuild_rollups
from metering.schema import RAW_COLUMNS, ROLLUPS
from tenancy.settings import Settings


def _event(
    tenant: str = "t1", units: str = "1", at: datetime | None = None, **kw: Any
) -> UsageEvent:
    at = at or datetime.now(UTC) - timedelta(hours=1)
    return UsageEvent(
        tenant_id=tenant, meter=kw.pop("meter", "api_calls"), subject=kw.pop("subject", "k1"),
        time_ms=int(at.timestamp() * 1000), units=Decimal(units), bytes_out=100, **kw,
    )


def _rollup_counts(ch: Client, tenant: str) -> dict[str, tuple[int, Decimal, int]]:
    out = {}
    for table in ROLLUPS.values():
        row = ch.query(
            f"SELECT countMerge(events), sumMerge(units_sum), sumMerge(bytes_out) FROM {table} "  # noqa: S608
            "WHERE tenant_id = {t:String}", parameters={"t": tenant},
        ).result_rows[0]
        out[table] = (int(row[0]), Decimal(row[1]), int(row[2]))
    return out


def test_migrate_is_idempotent_and_recorded(ch: Client, ch_settings: Settings) -> None:
    assert migrate(ch, ch_settings) == []
    versions = [r[0] for r in ch.query("SELECT version FROM schema_migrations ORDER BY version")
                .result_rows]
    assert versions == ["0001_usage_events", "0002_rollup_tables", "0003_rollup_views",
                        "0004_finance_views"]
    tables = {r[0] for r in ch.query("SELECT name FROM system.tables "
                                     "WHERE database = currentDatabase()").result_rows}
    assert {"usage_events", *ROLLUPS.values(), "usage_hour_mv", "usage_day_mv"} <= tables


def test_raw_table_contract(ch: Client) -> None:
    cols = [r[0] for r in ch.query("SELECT name FROM system.columns WHERE database = "
                                   "currentDatabase() AND table = 'usage_events' ORDER BY position")
            .result_rows]
    assert tuple(cols[: len(RAW_COLUMNS)]) == RAW_COLUMNS
    assert cols[len(RAW_COLUMNS):] == ["ingested_at"]
    sorting, partition, engine = ch.query(
        "SELECT sorting_key, partition_key, engine_full FROM system.tables "
        "WHERE database = currentDatabase() AND name = 'usage_events'"
    ).result_rows[0]
    assert sorting == "tenant_id, meter, time, event_id"
    assert partition == "toYYYYMM(time)"
    assert "toIntervalDay(400)" in engine
    assert "non_replicated_deduplication_window = 10000" in engine


def test_ttl_follows_the_setting(ch: Client, ch_settings: Settings) -> None:
    from dataclasses import replace

    assert migrate(ch, replace(ch_settings, raw_ttl_days=90)) == []
    engine = ch.query("SELECT engine_full FROM system.tables WHERE database = currentDatabase() "
                      "AND name = 'usage_events'").result_rows[0][0]
    assert "toIntervalDay(90)" in engine


def test_reinserted_block_with_its_token_is_counted_once(ch: Client) -> None:
    events = [_event(units="2.5"), _event(units="1.5", subject="k2")]
    for _ in range(3):
        insert_events(ch, events, "gateway", "batch-1")
    assert ch.query("SELECT count() FROM usage_events").result_rows[0][0] == 2
    for table, got in _rollup_counts(ch, "t1").items():
        assert got == (2, Decimal("4"), 200), table
    insert_events(ch, [_event(units="1")], "gateway", "batch-2")
    for table, got in _rollup_counts(ch, "t1").items():
        assert got == (3, Decimal("5"), 300), table


def test_corrections_are_new_rows(ch: Client) -> None:
    insert_events(ch, [_event(units="10", meter="tokens")], "api", "a")
    insert_events(ch, [_event(units="-4", meter="tokens")], "correction", "b")
    assert ch.query("SELECT count() FROM usage_events").result_rows[0][0] == 2
    row = ch.query("SELECT sumMerge(units_sum), countMerge(events) FROM usage_hour").result_rows[0]
    assert (Decimal(row[0]), row[1]) == (Decimal(6), 1)
    insert_events(ch, [_event(), _event(), _event(units="-1")], "gateway", "c")
    insert_events(ch, [_event(units="-1")], "correction", "d")
    for view in ("usage_hourly", "usage_daily"):  # the finance views finalize the same states
        got = ch.query(f"SELECT meter, sum(events), sum(events_net), sum(units) FROM {view} "  # noqa: S608
                       "WHERE tenant_id = 't1' GROUP BY meter ORDER BY meter").result_rows
        assert got == [("api_calls", 3, Decimal(2), Decimal(0)),
                       ("tokens", 1, Decimal(-3), Decimal(6))], view


def test_client_is_cached_per_target(ch: Client, ch_settings: Settings, tmp_path: Path) -> None:
    assert clickhouse.connect(ch_settings) is ch
    other = Settings(clickhouse_url=f"chdb://{tmp_path / 'other'}")
    moved = clickhouse.connect(other)
    assert moved is not ch
    assert moved.query("SELECT count() FROM system.tables WHERE database = currentDatabase() "
                       "AND name = 'usage_events'").result_rows[0][0] == 0


def test_rebuild_replaces_rollup_partitions(ch: Client) -> None:
    at = datetime.now(UTC) - timedelta(hours=2)
    month = int(f"{at:%Y%m}")
    insert_events(ch, [_event(units="2", at=at), _event(units="3", at=at)], "gateway", "live")
    # a bulk load that reaches the raw table without passing through the views
    ch.command("CREATE TABLE stage AS usage_events")
    ch.command("INSERT INTO stage SELECT * FROM usage_events")
    ch.command("INSERT INTO stage (event_id, tenant_id, meter, subject, time, units, bytes_out, "
               "source) VALUES (generateUUIDv4(), 't1', 'api_calls', 'k9', "
               "{at:DateTime64(3, 'UTC')}, 5, 0, 'bulk')", parameters={"at": at})
    ch.command("ALTER TABLE usage_events REPLACE PARTITION {m:UInt32} FROM stage",
               parameters={"m": month})
    assert ch.query("SELECT count() FROM usage_events").result_rows == [(3,)]
    assert _rollup_counts(ch, "t1")["usage_hour"] == (2, Decimal(5), 200)
    for _ in range(2):  # a recompute replaces, so running it twice changes nothing
        assert rebuild_rollups(ch, month) == ["usage_minute", "usage_hour", "usage_day"]
        for table, got in _rollup_counts(ch, "t1").items():
            assert got == (3, Decimal(10), 200), table
