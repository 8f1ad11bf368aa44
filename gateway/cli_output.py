"""How CLI results reach the terminal: JSON alone on stdout for scripts, rich for people.

With `--json` nothing but one JSON document is written to stdout (the result, or the problem
document on failure, with a non-zero exit), so `tollway ... --json | jq` always parses;
human-facing notes and errors go to stderr.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import date
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tenancy.problems import Problem


def out() -> Console:
    """A console per call, so the terminal width (COLUMNS) is read when printing."""
    return Console()


def err() -> Console:
    return Console(stderr=True)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f") if value.is_finite() else str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(doc: Any) -> bytes:
    return orjson.dumps(
        doc, default=_default, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
    )


def emit_json(doc: Any) -> None:
    sys.stdout.write(to_json(doc).decode() + "\n")
    sys.stdout.flush()


def line(text: str) -> None:
    """One bare line on stdout (an id or a secret), for `$(tollway ...)` in scripts."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return str(_default(value))
    if isinstance(value, (dict, list, tuple)):
        return to_json(value).decode().replace("\n", "").replace("  ", "")
    return str(value)


def table(title: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    view = Table(title=title, title_justify="left")
    for column in columns:
        view.add_column(column, overflow="fold")
    for row in rows:
        view.add_row(*(_cell(row.get(column)) for column in columns))
    out().print(view)


def record(title: str, doc: Mapping[str, Any]) -> None:
    view = Table(title=title, title_justify="left", show_header=False)
    view.add_column("field", style="bold")
    view.add_column("value", overflow="fold")
    for key, value in doc.items():
        view.add_row(str(key), _cell(value))
    out().print(view)


def problem(exc: Problem, *, as_json: bool) -> None:
    if as_json:
        emit_json(exc.body())
        return
    err().print(f"[bold red]error:[/] {exc.detail}", highlight=False)
    for item in exc.extra.get("errors", ()):
        err().print(f"  [red]{item.get('field')}[/]: {item.get('message')}", highlight=False)


def secret_notice(what: str, secret: str) -> None:
    err().print(f"[bold yellow]{what}: shown once, it cannot be recovered.[/]")
    line(secret)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err(), transient=False,
    )


def jsonable(value: Any) -> Any:
    """A ClickHouse value as JSON can carry it: containers kept, odd scalars (IPs, bytes,
    enums) as text; numbers, Decimals, dates and UUIDs are left to `to_json`."""
    if value is None or isinstance(value, (bool, int, float, str, Decimal, date, UUID)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def csv_rows(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """RFC 4180 CSV with a header on stdout; containers as compact JSON, NULL as empty."""
    writer = csv.writer(sys.stdout, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow("" if v is None else _cell(v) for v in row)
    sys.stdout.flush()
