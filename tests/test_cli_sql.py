"""The operator commands beside `usage`: `sql`, `analysts create`, `migrate` on a sharded
layout, and `scheduler` (once and as a process), on real chDB, SQLite and Redis."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from cli_harness import Cli

from gateway import bootstrap
from metering import clickhouse
from metering.events import UsageEvent
from metering.ingest import insert_events
from metering.migrations import migrate
from tenancy import tenants


@pytest.fixture
def rows(cli: Cli) -> int:
    """Twelve api_calls of two tenants (7 and 5) and one token event, in chDB."""
    settings = cli.settings()
    client = clickhouse.connect(settings)
    migrate(client, settings)
    at = int((datetime.now(UTC) - timedelta(days=1)).timestamp() * 1000)
    events = [UsageEvent("acme" if i < 7 else "globex", "api_calls", "k1", at + i, route="/v1")
              for i in range(12)]
    events.append(UsageEvent("acme", "tokens", "k1", at, units=Decimal("2.5"),
                             dims={"model": "m1"}))
    insert_events(client, events, "gateway", "seed")
    clickhouse.close()
    return len(events)


COUNT = ("SELECT tenant_id, count() AS calls, max(dims) AS dims FROM usage_events "
         "WHERE meter = 'api_calls' GROUP BY tenant_id ORDER BY tenant_id")


def test_sql_table_json_and_csv(cli: Cli, rows: int) -> None:
    doc = cli.json("sql", COUNT)
    assert doc == {"columns": ["tenant_id", "calls", "dims"],
                   "rows": [["acme", 7, {}], ["globex", 5, {}]]}
    human = cli("sql", COUNT).stdout
    assert "2 rows" in human and "globex" in human and "calls" in human
    text = cli("sql", COUNT, "--format", "csv").stdout
    assert list(csv.reader(io.StringIO(text))) == [["tenant_id", "calls", "dims"],
                                                   ["acme", "7", "{}"], ["globex", "5", "{}"]]
    units = cli.json("sql", "SELECT units, dims FROM usage_events WHERE meter = 'tokens'")
    assert units["rows"] == [["2.500000000", {"model": "m1"}]]


@pytest.mark.parametrize("statement", [
    "INSERT INTO usage_events (tenant_id, meter) VALUES ('evil', 'api_calls')",
    "ALTER TABLE usage_events DELETE WHERE 1",
    "DROP TABLE usage_events",
    "CREATE TABLE x (a Int8) ENGINE = Memory",
    "SYSTEM DROP MARK CACHE",
    "SELECT 1; DROP TABLE usage_events",
    "TRUNCATE TABLE usage_events",
])
def test_sql_refuses_writes(cli: Cli, rows: int, statement: str) -> None:
    problem = cli.json("sql", statement, code=1)
    assert problem["status"] == 422 and problem["errors"][0]["field"] == "sql"
    refused = cli("sql", statement, code=1)
    assert refused.stderr.startswith("error:") and refused.stdout == ""
    assert cli.json("sql", "SELECT count() FROM usage_events")["rows"] == [[rows]]


def test_sql_engine_refusals_and_errors_exit_1(cli: Cli, rows: int) -> None:
    # the text check passes this one; the read-only session refuses it
    reading = cli.json("sql", "SELECT * FROM file('/etc/hostname', 'LineAsString')", code=1)
    assert reading["status"] == 400 and "readonly" in reading["detail"].lower()
    broken = cli("sql", "SELECT no_such_column FROM usage_events", code=1)
    assert "no_such_column" in broken.stderr
    cli("sql", "SELECT 1", "--format", "xml", code=2)


HOLD_CHDB = """
import sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
client.query("SELECT 1")
print("open", flush=True)
sys.stdin.read()
"""


def test_chdb_held_by_another_process_is_a_503(cli: Cli) -> None:
    """What an operator sees running `sql` or `usage` beside an embedded `tollway serve`."""
    tenant = cli("tenants", "create", "Acme", "--email", "ops@acme.example").stdout.strip()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CHDB,
                               str(cli.env["TOLLWAY_CLICKHOUSE_URL"])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        problem = cli.json("sql", "SELECT 1", code=1)
        assert problem["status"] == 503 and "one process at a time" in problem["detail"]
        assert "one process at a time" in cli("usage", "quota", tenant, code=1).stderr
    finally:
        holder.communicate(timeout=30)
    assert cli.json("sql", "SELECT 1 AS one")["rows"] == [[1]]


def test_analysts_create_needs_a_server(cli: Cli) -> None:
    tenant = cli("tenants", "create", "Acme", "--email", "ops@acme.example").stdout.strip()
    problem = cli.json("analysts", "create", tenant, "--user", "acme_analyst", code=1)
    assert problem["status"] == 501 and "ClickHouse server" in problem["detail"]
    assert "ClickHouse server" in cli("analysts", "create", tenant, "--user", "acme_analyst",
                                      code=1).stderr
    assert cli.json("analysts", "create", "nobody", "--user", "a", code=1)["status"] == 404
    bad = cli.json("analysts", "create", tenant, "--user", "drop table;", code=1)
    assert bad["status"] == 422 and bad["errors"][0]["field"] == "user"


def test_migrate_skips_the_ttl_of_a_non_mergetree_usage_events(cli: Cli) -> None:
    """On a cluster `usage_events` is Distributed; chDB has no cluster, so a Merge table over
    the local one stands in (ClickHouse refuses MODIFY TTL on both). The MergeTree rollup in
    the same run still gets the new TTL."""
    settings = cli.settings()
    client = clickhouse.connect(settings)
    migrate(client, settings)
    client.command("RENAME TABLE usage_events TO usage_events_local")
    client.command("CREATE TABLE usage_events AS usage_events_local "
                   "ENGINE = Merge(currentDatabase(), '^usage_events_local$')")
    clickhouse.close()

    cli.env["TOLLWAY_RAW_TTL_DAYS"] = "30"
    assert cli.json("migrate")["clickhouse"]["applied"] == []
    client = clickhouse.connect(settings)
    engines = {str(name): str(engine) for name, engine in client.query(
        "SELECT name, engine_full FROM system.tables WHERE database = currentDatabase() "
        "AND name IN ('usage_events', 'usage_events_local', 'usage_minute')").result_rows}
    clickhouse.close()
    assert "toIntervalDay(30)" in engines["usage_minute"]
    assert "toIntervalDay(400)" in engines["usage_events_local"]  # a local table: by hand
    assert engines["usage_events"].startswith("Merge(")


def _trial_due(cli: Cli, name: str) -> str:
    """A tenant created 30 days ago, so its 14-day trial ended 16 days ago."""
    cp = bootstrap.open_control_plane(cli.settings())
    try:
        row = tenants.create(cp, actor="test", name=name, email="t@example.com", plan="starter",
                             now=datetime.now(UTC) - timedelta(days=30))
    finally:
        cp.close()
    assert datetime.fromisoformat(str(row["trial_ends_at"])) < datetime.now(UTC)
    return str(row["id"])


def test_scheduler_once_expires_a_trial_that_ended(cli: Cli) -> None:
    due = _trial_due(cli, "Ended Co")
    fresh = cli("tenants", "create", "Fresh", "--email", "f@example.com").stdout.strip()
    assert cli.json("scheduler", "--once") == {"trials_expired": 1, "deleted": 0}
    assert cli.json("tenants", "show", due)["status"] == "trial_expired"
    assert cli.json("tenants", "show", fresh)["status"] == "trial"
    again = cli("scheduler", "--once").stdout
    assert "trials_expired" in again and "1" not in again


def test_scheduler_process_runs_until_sigterm(cli: Cli) -> None:
    due = _trial_due(cli, "Ended Co")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    env.update({k: v for k, v in cli.env.items() if v is not None})
    env.update({"PYTHONPATH": str(Path(__file__).parents[1]), "PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "scheduler", "--interval", "1", "--json"],
        cwd=cli.tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while cli.json("tenants", "show", due)["status"] != "trial_expired":
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert orjson.loads(out) == {"scheduler": "started", "interval_s": 1.0}
        assert b"scheduler stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
