"""Monthly usage query for one tenant over 50 million raw events: rollups vs the raw table.

Generates the events in-engine (INSERT ... SELECT FROM numbers) into a chDB directory that is
kept between runs, so only the first run pays for generation. Like a bulk backfill, the events
go to a staging copy of the raw table, replace the month's raw partition, and the rollups are
recomputed with `rebuild_rollups` (one GROUP BY per rollup instead of the views' per-block
work, which is what live inserts pay). One tenant ("big") holds a
fifth of the events, the rest spread over 99 tenants, all in one calendar month.

    .venv/bin/python benchmarks/bench_usage_query.py [--events 50000000] [--runs 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from metering import clickhouse
from metering.meters import load_meters
from metering.migrations import migrate, rebuild_rollups
from metering.schema import RAW_TABLE
from metering.usage import month_bounds, pick_source, total, usage
from tenancy.settings import load_settings

MONTH = datetime(2026, 10, 15, tzinfo=UTC)  # inside the default 400-day raw TTL
TZ = "America/New_York"
CHUNK = 5_000_000

GENERATE = """
INSERT INTO bench_stage (event_id, tenant_id, meter, subject, time, units, route, method,
                          status, latency_ms, bytes_in, bytes_out, dims, source)
SELECT
    reinterpretAsUUID(toFixedString(concat(reinterpretAsString(number),
                                           reinterpretAsString(toUInt64(7))), 16)),
    if(number % 5 = 0, 'big', concat('t', toString(number % 99))),
    'api_calls',
    concat('k', toString(number % 1000)),
    fromUnixTimestamp64Milli(toInt64({start_ms:Int64} + intDiv(number * {span_ms:UInt64},
                                                                {events:UInt64})), 'UTC'),
    toDecimal128(1 + number % 7, 9),
    ['/a', '/b/{id}', '/c', '/d', '/e'][number % 5 + 1],
    ['GET', 'POST'][intDiv(number, 5) % 2 + 1],
    multiIf(number % 97 = 0, 404, number % 499 = 0, 500, 200),
    toFloat32(number % 300),
    number % 2000,
    number % 50000,
    map(),
    'bench'
FROM numbers({offset:UInt64}, {count:UInt64})
"""


def _timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000_000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tollway-bench-usage-chdb"))
    args = parser.parse_args()
    settings = load_settings(env={}, clickhouse_url=f"chdb://{args.dir.resolve()}")
    client = clickhouse.connect(settings)
    migrate(client, settings)
    start, end = month_bounds(MONTH, TZ)
    have = client.query("SELECT count() FROM usage_events").result_rows[0][0]
    if have != args.events:
        client.command("DROP TABLE IF EXISTS bench_stage")
        client.command("CREATE TABLE bench_stage AS usage_events")
        t0 = time.perf_counter()
        params = {"start_ms": int(start.timestamp() * 1000),
                  "span_ms": int((end - start).total_seconds() * 1000) - 1, "events": args.events}
        for offset in range(0, args.events, CHUNK):
            count = min(CHUNK, args.events - offset)
            client.command(GENERATE, parameters={**params, "offset": offset, "count": count})
            print(f"  generated {offset + count:,} events", flush=True)
        months = [int(r[0]) for r in client.query(
            "SELECT DISTINCT partition FROM system.parts WHERE database = currentDatabase() "
            "AND table = 'bench_stage' AND active").result_rows]
        for month in months:
            client.command("ALTER TABLE usage_events REPLACE PARTITION {m:UInt32} FROM bench_stage",
                           parameters={"m": month})
        client.command("DROP TABLE bench_stage")
        print(f"raw events: {time.perf_counter() - t0:.0f} s", flush=True)
        for month in months:
            rebuild_rollups(client, month)
        for table in ("usage_hour", "usage_day"):
            client.command(f"OPTIMIZE TABLE {table} FINAL")
        print(f"generation with rollups: {time.perf_counter() - t0:.0f} s")
    meter = load_meters(settings)["api_calls"]
    raw_rows = client.query("SELECT count() FROM usage_events WHERE tenant_id = 'big'"
                            ).result_rows[0][0]
    print(f"{have if have == args.events else args.events:,} raw events; tenant 'big' has "
          f"{raw_rows:,}; month {start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC ({TZ})")
    cases: dict[str, Callable[[str | None], object]] = {
        "daily series, month, tenant tz": lambda source: usage(
            client, meter, "big", start, end, "day", TZ, ("route",), source=source),
        "month total": lambda source: total(client, meter, "big", start, end, source=source),
    }
    print(f"rollup picked: {pick_source('day', TZ, start, end)}; {args.runs} runs each")
    print(f"{'query':34} {'rollup p50':>11} {'p99':>8} {'raw p50':>9} {'p99':>8} {'ratio p50':>10}")
    for name, run in cases.items():
        assert run(None) == run(RAW_TABLE), name
        fast = _timed(partial(run, None), args.runs)
        slow = _timed(partial(run, RAW_TABLE), max(10, args.runs // 10))
        print(f"{name:34} {fast[0]:9.2f}ms {fast[1]:6.2f}ms {slow[0]:7.1f}ms {slow[1]:6.1f}ms "
              f"{slow[0] / fast[0]:9.0f}x")
    clickhouse.close()


if __name__ == "__main__":
    main()
