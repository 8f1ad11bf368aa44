"""Read-only SQL on real chDB: the statement check and ClickHouse's own readonly=1."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from hypothesis import given, settings
from hypothesis import strategies as st

from metering import clickhouse
from metering.events import UsageEvent
from metering.ingest import insert_events
from metering.readonly_sql import analyst_statements, check_statement, create_analyst, run_readonly
from tenancy.problems import Problem
from tenancy.settings import Settings

REFUSED = [
    "INSERT INTO usage_events (tenant_id) VALUES ('x')",
    "ALTER TABLE usage_events DELETE WHERE 1",
    "DROP TABLE usage_events",
    "SYSTEM FLUSH LOGS",
    "CREATE TABLE x (a Int32) ENGINE = Memory",
    "TRUNCATE TABLE usage_events",
    "RENAME TABLE usage_events TO x",
    "OPTIMIZE TABLE usage_events FINAL",
    "KILL QUERY WHERE 1",
    "GRANT SELECT ON *.* TO default",
    "SET readonly = 0",
    "DETACH TABLE usage_events",
    "ATTACH TABLE usage_events",
    "SELECT 1; DROP TABLE usage_events",
    "SELECT 1; SELECT 2",
    "select 1 /* ; */ ; insert into usage_events (tenant_id) values ('x')",
    "SELECT 1 INTO OUTFILE '/tmp/out.csv'",
    "SELECT 1 SETTINGS readonly = 0",
    "-- just a comment",
    "(INSERT INTO usage_events (tenant_id) VALUES ('x'))",
]


@pytest.fixture
def ro(ch: Client, ch_settings: Settings) -> Client:
    at = datetime.now(UTC)
    insert_events(ch, [UsageEvent("t1", "tokens", "k", int(at.timestamp() * 1000), Decimal(3))],
                  "api", "one")
    return clickhouse.readonly_client(ch_settings)


@pytest.mark.parametrize("sql", REFUSED)
def test_writes_ddl_system_and_multi_statements_are_refused(
    ro: Client, ch: Client, sql: str
) -> None:
    with pytest.raises(Problem) as err:
        run_readonly(ro, sql)
    assert err.value.status == 422
    assert ch.query("SELECT count() FROM usage_events").result_rows == [(1,)]
    assert ch.query("EXISTS TABLE usage_events").result_rows == [(1,)]


@pytest.mark.parametrize("sql", [
    "INSERT INTO usage_events (tenant_id) VALUES ('x')",
    "CREATE TABLE x (a Int32) ENGINE = Memory",
    "SYSTEM FLUSH LOGS",
    "SELECT * FROM file('/etc/hostname', 'LineAsString')",
])
def test_the_engine_refuses_writes_on_the_readonly_session(
    ro: Client, ch: Client, sql: str
) -> None:
    with pytest.raises(DatabaseError, match="readonly"):
        ro.query(sql)
    assert ch.query("SELECT count() FROM usage_events").result_rows == [(1,)]


def test_table_functions_slip_past_the_text_check_but_not_the_engine(ro: Client) -> None:
    sql = "SELECT * FROM file('/etc/hostname', 'LineAsString')"
    assert check_statement(sql) == sql
    with pytest.raises(DatabaseError, match="readonly"):
        run_readonly(ro, sql)


def test_reads_are_answered(ro: Client) -> None:
    cols, rows = run_readonly(ro, "SELECT tenant_id, sum(units) AS u, 'DROP; x' AS s "
                                  "FROM usage_events GROUP BY tenant_id;")
    assert cols == ["tenant_id", "u", "s"]
    assert rows == [("t1", Decimal(3), "DROP; x")]
    cols, rows = run_readonly(ro, "WITH 2 AS n SELECT n * 2")
    assert rows == [(4,)]
    _, tables = run_readonly(ro, "SHOW TABLES")
    assert ("usage_events",) in tables
    _, sys_rows = run_readonly(ro, "SELECT count() > 0 FROM system.tables")
    assert sys_rows == [(1,)]


def test_result_size_is_bounded(ro: Client) -> None:
    with pytest.raises(DatabaseError, match="max rows"):
        run_readonly(ro, "SELECT number FROM numbers(1000000)")


def test_a_writable_client_is_refused(ch: Client) -> None:
    with pytest.raises(Problem) as err:
        run_readonly(ch, "SELECT 1")
    assert err.value.status == 500


def test_analyst_statements_are_valid_clickhouse_sql(ch: Client) -> None:
    stmts = analyst_statements("ten_123", "acme_analyst", "s3cret-'quoted'-password")
    assert stmts[0].startswith("CREATE USER IF NOT EXISTS acme_analyst IDENTIFIED WITH "
                               "sha256_password BY 's3cret-\\'quoted\\'-password'")
    policies = [s for s in stmts if "ROW POLICY" in s]
    assert len(policies) == 4
    assert all("USING tenant_id = 'ten_123' TO acme_analyst" in s for s in policies)
    grants = [s for s in stmts if s.startswith("GRANT")]
    assert grants == [f"GRANT SELECT ON {t} TO acme_analyst"
                      for t in ("usage_events", "usage_minute", "usage_hour", "usage_day")]
    for statement in stmts:  # the parser accepts every statement (chDB has no access control)
        assert ch.query(f"EXPLAIN AST {statement}").result_rows
    for bad in [("t'1", "u", "p" * 16), ("t1", "u; DROP", "p" * 16), ("t1", "u", "short")]:
        with pytest.raises(Problem):
            analyst_statements(*bad)


def test_create_analyst_is_server_only(ch: Client) -> None:
    with pytest.raises(DatabaseError):
        create_analyst(ch, "t1", "acme_analyst", "p" * 20)


_WRITES = ["INSERT INTO t VALUES (1)", "DROP TABLE t", "ALTER TABLE t DELETE WHERE 1",
           "SYSTEM SHUTDOWN", "CREATE USER x", "TRUNCATE t", "SET readonly = 0", "KILL QUERY ALL"]


@settings(max_examples=60, deadline=None)
@given(
    first=st.sampled_from(["SELECT 1", "WITH 1 AS x SELECT x", "SHOW TABLES", "DESC t"]),
    write=st.sampled_from(_WRITES),
    gap=st.sampled_from([";", " ;", ";\n", "; -- c\n", ";/* c */"]),
    case=st.booleans(),
)
def test_a_second_statement_is_always_refused(first: str, write: str, gap: str,
                                              case: bool) -> None:
    sql = f"{first}{gap}{write.lower() if case else write}"
    with pytest.raises(Problem):
        check_statement(sql)


@settings(max_examples=60, deadline=None)
@given(word=st.sampled_from(_WRITES), quote=st.sampled_from(["'", "`", '"']))
def test_forbidden_words_inside_literals_and_comments_are_fine(word: str, quote: str) -> None:
    literal = f"{quote}{word}; {word}{quote}"
    sql = f"SELECT {literal} -- {word}\n/* {word}; */"
    assert check_statement(sql) == sql
