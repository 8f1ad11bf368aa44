"""Ad-hoc SQL for finance staff and tenant analysts, read-only twice over.

First a statement check refuses anything that is not one SELECT-like statement, so the
caller gets a clear 422 instead of an engine error. Then the query runs on a session that
ClickHouse itself keeps at `readonly=1` (metering.clickhouse.readonly_client), which also
blocks what a text check cannot see: file()/url() table functions, setting changes,
INTO OUTFILE. chDB honours readonly=1 (checked: INSERT, CREATE, SYSTEM and file() fail).

`create_analyst` is server-only: chDB has no users or row policies. It returns the
statements it ran so they can be reviewed and tested without a server.
"""

from __future__ import annotations

import re
from typing import Any

from clickhouse_connect.driver.client import Client

from tenancy.problems import Problem, invalid

ALLOWED_FIRST = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS"})
_COMMENTS = re.compile(r"--[^\n]*|#[^\n]*|/\*.*?\*/", re.S)
_LITERALS = re.compile(r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.)*\"|`(?:[^`\\]|\\.)*`", re.S)
_FORBIDDEN = re.compile(
    r"\b(INSERT|ALTER|DROP|CREATE|TRUNCATE|RENAME|OPTIMIZE|KILL|GRANT|REVOKE|ATTACH|DETACH|"
    r"DELETE|UPDATE|EXCHANGE|UNDROP|SETTINGS?|OUTFILE|SYSTEM(?!\s*\.))\b",
    re.I,
)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_TENANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_statement(sql: str) -> str:
    """The statement without a trailing `;`, or a 422 naming what was refused."""
    code = _LITERALS.sub("''", _COMMENTS.sub(" ", sql)).strip()
    if code.endswith(";"):
        code = code[:-1].rstrip()
        sql = sql.rstrip().removesuffix(";")
    if not code:
        raise invalid("empty query", "sql")
    if ";" in code:
        raise invalid("one statement at a time", "sql")
    first = code.split(None, 1)[0].upper().lstrip("(")
    if first not in ALLOWED_FIRST:
        raise invalid(f"only {sorted(ALLOWED_FIRST)} statements are allowed, not {first}", "sql")
    bad = _FORBIDDEN.search(code)
    if bad:
        raise invalid(f"{bad.group(1).upper()} is not allowed in a read-only query", "sql")
    return sql


def run_readonly(client: Client, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Columns and rows of one read-only query; `client` must be a read-only session."""
    if client.get_client_setting("readonly") not in ("1", "2"):
        raise Problem(500, "run_readonly needs a client from metering.clickhouse.readonly_client")
    statement = check_statement(sql)
    result = client.query(statement)
    return list(result.column_names), [tuple(r) for r in result.result_rows]


def analyst_statements(tenant_id: str, user: str, password: str) -> list[str]:
    """DDL for a read-only user who sees only `tenant_id`'s rows in every usage table."""
    if not _IDENT.match(user):
        raise invalid("user must be an identifier", "user")
    if not _TENANT.match(tenant_id):
        raise invalid("tenant_id has unexpected characters", "tenant_id")
    if len(password) < 16:
        raise invalid("password must be at least 16 characters", "password")
    secret = password.replace("\\", "\\\\").replace("'", "\\'")
    stmts = [
        f"CREATE USER IF NOT EXISTS {user} IDENTIFIED WITH sha256_password BY '{secret}' "
        "SETTINGS readonly = 1",
    ]
    for table in ("usage_events", "usage_minute", "usage_hour", "usage_day"):
        stmts.append(f"GRANT SELECT ON {table} TO {user}")
        stmts.append(
            f"CREATE ROW POLICY IF NOT EXISTS {user}_tenant ON {table} "
            f"FOR SELECT USING tenant_id = '{tenant_id}' TO {user}"
        )
    return stmts


def create_analyst(client: Client, tenant_id: str, user: str, password: str) -> list[str]:
    """Server mode only: run `analyst_statements`; returns them with the password masked."""
    stmts = analyst_statements(tenant_id, user, password)
    for statement in stmts:
        client.command(statement)
    return [_mask(s) for s in stmts]


def _mask(statement: str) -> str:
    return re.sub(r"BY '(?:[^'\\]|\\.)*'", "BY '***'", statement)
