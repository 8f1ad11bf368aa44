"""`tollway usage ...` and `tollway worker --metrics-port` on real chDB and SQLite.

Usage rows are written with metering.ingest.insert_events into the test's own chDB directory;
the expected numbers are counted in Python from the same events, not read back from ClickHouse.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest
from cli_harness import Cli

from metering import clickhouse
from metering.events import UsageEvent
from metering.ingest import insert_events
from metering.migrations import migrate
from metering.usage import month_bounds, previous_month
from tenancy.settings import load_settings

BERLIN = "Europe/Berlin"
NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
SPIKE = NOW - timedelta(days=2, hours=5)
ROUTES = ("/v1/chat", "/v1/files/{id}")




def _events(tenant: str) -> list[UsageEvent]:
    """Ten days of two calls an hour (one per route), a 40-call spike, tokens by model, and
    five calls in the middle of the previous month."""
    out = []
    for h in range(10 * 24, 0, -1):
        at = NOW - timedelta(hours=h)
        for i in range(40 if at == SPIKE else 2):
            out.append(UsageEvent(tenant, "api_calls", f"k{i % 3}",
                                  int(at.timestamp() * 1000) + i, route=ROUTES[i % 2],
                                  method="GET", status=200, bytes_out=100))
        out.append(UsageEvent(tenant, "tokens", "k0", int(at.timestamp() * 1000) + 500,
                              units=Decimal(10 + h % 5),
                              dims={"model": "small" if h % 2 else "large"}))
    last_month, _ = previous_month(month_bounds(NOW, BERLIN)[0], BERLIN)
    for i in range(5):
        out.append(UsageEvent(tenant, "api_calls", "k0",
                              int((last_month + timedelta(days=10)).timestamp() * 1000) + i,
                              route=ROUTES[0], method="GET", status=200))
    return out


@pytest.fixture
def seeded(cli: Cli) -> tuple[str, list[UsageEvent]]:
    tenant = cli("tenants", "create", "Acme", "--email", "ops@acme.example", "--plan", "starter",
                 "--timezone", BERLIN).stdout.strip()
    settings = load_settings(env={}, data_dir=cli.tmp / "data",
                             clickhouse_url=str(cli.env["TOLLWAY_CLICKHOUSE_URL"]))
    client = clickhouse.connect(settings)
    migrate(client, settings)
    events = _events(tenant)
    insert_events(client, events, "gateway", "seed")
    clickhouse.close()
    return tenant, events


def _at(event: UsageEvent) -> datetime:
    return datetime.fromtimestamp(event.time_ms / 1000, UTC)


def _calls(events: list[UsageEvent], start: datetime, end: datetime) -> int:
    return sum(1 for e in events if e.meter == "api_calls" and start <= _at(e) < end)


def test_usage_show_by_local_day_and_route(cli: Cli, seeded: tuple[str, list[UsageEvent]]) -> None:
    tenant, events = seeded
    first = (NOW - timedelta(days=6)).astimezone(ZoneInfo("America/New_York")).date()
    last = first + timedelta(days=3)
    doc = cli.json("usage", "show", tenant, "--meter", "api_calls", "--window", "day",
                   "--from", first.isoformat(), "--to", last.isoformat(),
                   "--tz", "America/New_York", "--group-by", "route")
    assert doc["tz"] == "America/New_York" and doc["window"] == "day"
    [series] = doc["series"]
    got = {(r["period_start"][:10], r["dims"]["route"]): int(r["value"]) for r in series["rows"]}
    ny = ZoneInfo("America/New_York")
    want = Counter((_at(e).astimezone(ny).date().isoformat(), e.route) for e in events
                   if e.meter == "api_calls" and first <= _at(e).astimezone(ny).date() < last)
    assert got == dict(want) and len(got) == 6

    human = cli("usage", "show", tenant, "--meter", "tokens", "--window", "month",
                "--from", f"{NOW - timedelta(days=5):%Y-%m-%d}", "--group-by", "model").stdout
    assert "tokens" in human and "small" in human and "large" in human and BERLIN in human


def test_usage_totals_quota_and_report(cli: Cli, seeded: tuple[str, list[UsageEvent]]) -> None:
    tenant, events = seeded
    start, end = month_bounds(NOW, BERLIN)
    prev_start, prev_end = previous_month(start, BERLIN)
    this_month, last_month = _calls(events, start, end), _calls(events, prev_start, prev_end)

    totals = cli.json("usage", "totals", tenant)
    assert Decimal(totals["totals"]["api_calls"]) == this_month
    tokens = sum(e.units for e in events if e.meter == "tokens" and start <= _at(e) < end)
    assert Decimal(totals["totals"]["tokens"]) == tokens
    assert "api_calls" in cli("usage", "totals", tenant).stdout

    quota = cli.json("usage", "quota", tenant)
    lines = {q["meter"]: q for q in quota["quotas"]}
    assert quota["plan"] == "starter" and lines["api_calls"]["limit"] == 10_000
    assert Decimal(lines["api_calls"]["used"]) == this_month
    assert Decimal(lines["api_calls"]["percent"]) == (Decimal(this_month) / 100).quantize(
        Decimal("0.1"))
    assert datetime.fromisoformat(lines["api_calls"]["resets_at"]) == end
    assert "ai_interactions" in cli("usage", "quota", tenant).stdout

    report = cli.json("usage", "report", tenant)
    calls = next(line for line in report["lines"] if line["meter"] == "api_calls")
    assert Decimal(calls["current"]) == this_month
    assert Decimal(calls["previous"]) == last_month
    assert Decimal(calls["change"]) == this_month - last_month
    month = f"{prev_start.astimezone(ZoneInfo(BERLIN)):%Y-%m}"
    older = cli.json("usage", "report", tenant, "--period", month)
    assert Decimal(next(x for x in older["lines"] if x["meter"] == "api_calls")["current"]) \
        == last_month
    assert "change_percent" in cli("usage", "report", tenant).stdout


def test_usage_export_writes_real_csv_and_parquet(
    cli: Cli, seeded: tuple[str, list[UsageEvent]]
) -> None:
    tenant, events = seeded
    berlin = ZoneInfo(BERLIN)
    first = (NOW - timedelta(days=5)).astimezone(berlin).date()
    last = first + timedelta(days=2)
    lo = datetime.combine(first, datetime.min.time(), berlin)
    hi = datetime.combine(last, datetime.min.time(), berlin)

    out = cli.tmp / "usage.csv"
    doc = cli.json("usage", "export", tenant, "--format", "csv", "--out", str(out),
                   "--from", first.isoformat(), "--to", last.isoformat())
    assert doc["bytes"] == out.stat().st_size and doc["tz"] == BERLIN
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert {r["day"] for r in rows} == {first.isoformat(), (first + timedelta(days=1)).isoformat()}
    assert sum(int(r["events"]) for r in rows if r["meter"] == "api_calls") \
        == _calls(events, lo, hi)
    assert {r["route"] for r in rows if r["meter"] == "api_calls"} == set(ROUTES)

    parquet = cli.tmp / "usage.parquet"
    said = cli("usage", "export", tenant, "--format", "parquet", "--out", str(parquet)).stdout
    body = parquet.read_bytes()
    assert body[:4] == b"PAR1" and body[-4:] == b"PAR1" and len(body) > 100
    assert "parquet" in said and not (cli.tmp / ".usage.parquet.part").exists()


def test_usage_analytics_flags_the_spike(cli: Cli, seeded: tuple[str, list[UsageEvent]]) -> None:
    tenant, _events = seeded
    doc = cli.json("usage", "analytics", tenant, "--meter", "api_calls")
    assert [datetime.fromisoformat(a["at"]) for a in doc["anomalies"]] == [SPIKE]
    assert doc["anomalies"][0]["value"] == 40 and doc["threshold"] == 2.0
    assert len(doc["forecast"]["hourly"]) == 7 * 24
    assert datetime.fromisoformat(doc["forecast"]["hourly"][0]["at"]) == NOW
    assert doc["plan_fit"]["action"] in {"keep", "downgrade", "upgrade"}
    assert doc["plan_fit"]["reason"]

    human = cli("usage", "analytics", tenant, "--meter", "api_calls", "--threshold", "3").stdout
    assert "anomalous hours" in human and f"{SPIKE:%Y-%m-%d %H:%M}" in human
    assert "forecast per 24 h" in human


def test_usage_input_errors(cli: Cli, seeded: tuple[str, list[UsageEvent]]) -> None:
    tenant, _events = seeded
    missing = cli.json("usage", "show", "nobody", "--meter", "api_calls", code=1)
    assert missing["status"] == 404
    assert "does not exist" in cli("usage", "quota", "nobody", code=1).stderr
    for args, option in [
        (("show", tenant, "--meter", "nope"), "--meter"),
        (("show", tenant, "--tz", "Mars/Olympus"), "--tz"),
        (("show", tenant, "--from", "2026-13-01"), "--from"),
        (("show", tenant, "--from", "2026-11-02", "--to", "2026-11-01"), "--from"),
        (("show", tenant, "--window", "week"), "--window"),
        (("show", tenant, "--meter", "tokens", "--group-by", "status"), "--group-by"),
        (("totals", tenant, "--period", "January"), "--period"),
        (("export", tenant, "--format", "xlsx", "--out", "x.xlsx"), "--format"),
        (("analytics", tenant, "--meter", "nope"), "--meter"),
        (("analytics", tenant, "--threshold", "0.1"), "--threshold"),
    ]:
        assert option in cli("usage", *args, code=2).stderr, args


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_worker_serves_its_metrics(tmp_path: Path, redis_url: str) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    env.update({
        "TOLLWAY_DATA_DIR": str(tmp_path / "data"), "TOLLWAY_REDIS_URL": redis_url,
        "TOLLWAY_CLICKHOUSE_URL": f"chdb://{tmp_path / 'chdb'}",
        "PYTHONPATH": str(Path(__file__).parents[1]), "PYTHONUNBUFFERED": "1",
    })
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "worker", "--metrics-port", str(port), "--json"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        assert proc.stderr is not None
        while b"metering worker" not in proc.stderr.readline():
            assert time.monotonic() < deadline and proc.poll() is None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for name in ("tollway_usage_insert_seconds_bucket", "tollway_usage_events_stored_total",
                     "tollway_usage_events_dead_lettered_total"):
            assert name in text, name
        proc.send_signal(signal.SIGTERM)
        out, _err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert orjson.loads(out)["metrics"] == f"http://127.0.0.1:{port}/metrics"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_worker_metrics_port_in_use_is_a_configuration_error(cli: Cli) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failed = cli("worker", "--metrics-port", str(port), code=2)
    assert f"127.0.0.1:{port}" in failed.stderr


def test_usage_correct_adds_signed_rows_once_per_id(
    cli: Cli, seeded: tuple[str, list[UsageEvent]]
) -> None:
    tenant, events = seeded
    start, end = month_bounds(NOW, BERLIN)
    before = Decimal(cli.json("usage", "totals", tenant)["totals"]["api_calls"])
    assert before == _calls(events, start, end)
    at = (NOW - timedelta(hours=1)).isoformat()
    args = ("usage", "correct", tenant, "--meter", "api_calls", "--units", "-3", "--at", at,
            "--reason", "retried by the gateway during incident 42", "--id", "inc-42")
    first = cli.json(*args)
    again = cli.json(*args)
    assert first["event_id"] == again["event_id"]
    after = Decimal(cli.json("usage", "totals", tenant)["totals"]["api_calls"])
    assert after == before - 3  # the same --id twice counts once
    cli("usage", "correct", tenant, "--meter", "api_calls", "--units", "zero", "--at", at,
        "--reason", "x", code=2)
    cli("usage", "correct", tenant, "--meter", "nope", "--units", "1", "--at", at,
        "--reason", "x", code=2)
    cli("usage", "correct", tenant, "--meter", "api_calls", "--units", "1",
        "--at", "2026-11-02T10:00:00", "--reason", "x", code=2)
