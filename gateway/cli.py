"""The `tollway` command line.

Commands talk to the control plane directly (not through the admin API), on the store the
settings name, so they work before any server runs; the embedded SQLite file is migrated on
first use. Every command takes `--json`. Exit codes: 0 success, 1 a refused operation (a
Problem), 2 a usage or configuration error.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import orjson
import typer

from gateway import bootstrap, cli_output, server
from gateway import demo as demo_run
from tenancy import admin_tokens, keys, onboarding, plans, tenants
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem
from tenancy.settings import Settings, load_settings

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from metering.analytics import Advice
    from metering.export import Format
    from metering.meters import Meter

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Tollway: a tenant-aware metering gateway.")
tenants_app = typer.Typer(no_args_is_help=True, help="Create, inspect and change tenants.")
keys_app = typer.Typer(no_args_is_help=True, help="Tenant API keys.")
plans_app = typer.Typer(no_args_is_help=True, help="Plans and their versions.")
tokens_app = typer.Typer(no_args_is_help=True, help="Admin API tokens.")
usage_app = typer.Typer(no_args_is_help=True,
                        help="A tenant's usage: series, totals, quota, report, export, analytics.")
analysts_app = typer.Typer(no_args_is_help=True,
                           help="Read-only ClickHouse logins for tenant analysts (server mode).")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(plans_app, name="plans")
app.add_typer(tokens_app, name="admin-tokens")
app.add_typer(usage_app, name="usage")
app.add_typer(analysts_app, name="analysts")

Json = Annotated[bool, typer.Option("--json", help="Print only machine-readable JSON on stdout.")]
TENANT_COLUMNS = ("id", "name", "status", "plan_id", "plan_version", "region", "created_at")
KEY_COLUMNS = ("id", "name", "mode", "prefix", "scopes", "created_at", "expires_at", "revoked_at")


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", envvar="TOLLWAY_CONFIG", help="TOML settings file.",
                     dir_okay=False),
    ] = None,
) -> None:
    ctx.obj = config


def _settings(ctx: typer.Context) -> Settings:
    config: Path | None = ctx.find_root().obj
    try:
        return load_settings(config_file=config)
    except (ValueError, OSError) as exc:
        cli_output.err().print(f"[bold red]configuration error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


@contextmanager
def _reporting(as_json: bool) -> Iterator[None]:
    """Turn a refused operation into the CLI's error output and exit code 1."""
    try:
        yield
    except Problem as exc:
        cli_output.problem(exc, as_json=as_json)
        raise typer.Exit(1) from None


@contextmanager
def _control_plane(ctx: typer.Context, as_json: bool) -> Iterator[ControlPlane]:
    settings = _settings(ctx)
    with _reporting(as_json):
        cp = bootstrap.open_control_plane(settings)
        try:
            yield cp
        finally:
            cp.close()


def _when(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter("use an ISO 8601 date-time", param_hint=option) from None


# serving and operations


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port.")] = None,
    upstream: Annotated[str | None, typer.Option(help="Default upstream URL.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes.")] = None,
    admin_host: Annotated[str | None, typer.Option(help="Separate admin listener address.")] = None,
    admin_port: Annotated[int | None, typer.Option(help="Separate admin listener port.")] = None,
    as_json: Json = False,
) -> None:
    """Run the gateway (and, embedded, the metering consumer and scheduler) until SIGTERM."""
    # Workers rebuild settings from the environment, so options travel as TOLLWAY_* variables.
    for name, value in (("HOST", host), ("PORT", port), ("UPSTREAM", upstream),
                        ("WORKERS", workers), ("ADMIN_HOST", admin_host),
                        ("ADMIN_PORT", admin_port)):
        if value is not None:
            os.environ[f"TOLLWAY_{name}"] = str(value)
    config: Path | None = ctx.find_root().obj
    if config is not None:
        os.environ["TOLLWAY_CONFIG"] = str(config.resolve())
    settings = _settings(ctx)
    server.configure_logging(settings)
    with _reporting(as_json):
        prepared = server.prepare(settings, settings.workers)
    admin_url = (f"http://{settings.admin_host or settings.host}:{settings.admin_port}"
                 if settings.admin_port is not None else f"http://{settings.host}:{settings.port}")
    summary = {
        "listen": f"http://{settings.host}:{settings.port}",
        "admin_api": admin_url + "/admin/v1",
        "workers": prepared.workers,
        "background_jobs": prepared.jobs_in_process,
        "backends": prepared.backends.as_dict(),
        "admin_token": prepared.new_token,
    }
    if as_json:
        cli_output.emit_json(summary)
    else:
        cli_output.record("tollway serve", {k: v for k, v in summary.items() if k != "admin_token"})
        if prepared.new_token is not None:
            cli_output.err().print(
                "[bold yellow]WARNING: no platform admin token existed, so one was created. "
                "It is shown ONCE and only its hash is stored; keep it now:[/]"
            )
            cli_output.line(prepared.new_token)
    server.run(settings, prepared)


@app.command()
def migrate(ctx: typer.Context, as_json: Json = False) -> None:
    """Upgrade the control-plane schema (Alembic) and the ClickHouse schema."""
    from metering import clickhouse
    from metering.migrations import migrate as migrate_clickhouse

    settings = _settings(ctx)
    found = bootstrap.backends(settings)
    with _reporting(as_json), cli_output.progress() as bar:
        task = bar.add_task("migrating", total=2)
        bar.update(task, description=f"control plane ({found.control_plane})")
        revision = bootstrap.migrate_control_plane(settings)
        bar.advance(task)
        bar.update(task, description=f"analytics ({found.analytics})")
        try:
            applied = migrate_clickhouse(clickhouse.connect(settings), settings)
        finally:
            clickhouse.close()
        bar.advance(task)
    result = {
        "control_plane": {"backend": found.control_plane, "revision": revision},
        "clickhouse": {"backend": found.analytics, "applied": applied},
    }
    if as_json:
        cli_output.emit_json(result)
    else:
        cli_output.out().print(f"control plane ({found.control_plane}) at revision {revision}")
        cli_output.out().print(
            f"clickhouse ({found.analytics}): "
            + (f"applied {', '.join(applied)}" if applied else "up to date")
        )


@app.command()
def worker(
    ctx: typer.Context,
    metrics_port: Annotated[int, typer.Option(
        min=0, max=65535, help="Serve Prometheus metrics on this port (0: off).")] = 9464,
    metrics_host: Annotated[str, typer.Option(help="Address of the metrics listener.")]
    = "127.0.0.1",
    as_json: Json = False,
) -> None:
    """Run the metering consumer (Redis Streams to ClickHouse) until SIGTERM.

    Its Prometheus metrics (lag, insert time, dead letters) are served on --metrics-port."""
    from prometheus_client import start_http_server

    from metering.worker import main_worker

    settings = _settings(ctx)
    server.configure_logging(settings)
    metrics = None
    if metrics_port:
        try:
            start_http_server(metrics_port, addr=metrics_host)
        except OSError as exc:
            cli_output.err().print(f"[bold red]cannot serve metrics on {metrics_host}:"
                                   f"{metrics_port}:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None
        metrics = f"http://{metrics_host}:{metrics_port}/metrics"
    if as_json:
        backends = bootstrap.backends(settings).as_dict()
        cli_output.emit_json({"worker": "started", "backends": backends, "metrics": metrics})
    main_worker(settings)


@app.command("scheduler")
def scheduler_cmd(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="Run one pass, print the counts, exit.")]
    = False,
    interval: Annotated[float, typer.Option(min=1, help="Seconds between passes.")]
    = bootstrap.SCHEDULER_INTERVAL_S,
    as_json: Json = False,
) -> None:
    """Run the lifecycle scheduler (trial ends, deletion after grace) until SIGTERM.

    With --once: one pass, then print the counts. Run one such process in production."""
    from tenancy import scheduler

    with _control_plane(ctx, as_json) as cp:
        server.configure_logging(cp.settings)
        if once:
            counts = scheduler.run_once(cp)
            if as_json:
                cli_output.emit_json(counts)
            else:
                cli_output.record("scheduler pass", counts)
            return
        if as_json:
            cli_output.emit_json({"scheduler": "started", "interval_s": interval})
        stop = threading.Event()
        loop = threading.Thread(target=scheduler.run_forever, args=(cp, interval, stop),
                                name="scheduler")
        # The handler only sets the event; the main thread waits in join(), not on the event.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        logging.getLogger("tollway.scheduler").info("scheduler started, every %.0f s", interval)
        loop.start()
        while loop.is_alive():
            loop.join(0.5)
        logging.getLogger("tollway.scheduler").info("scheduler stopped")


@app.command()
def demo(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="Gateway port (default: a free one).")]
    = None,
    as_json: Json = False,
) -> None:
    """Run the gateway embedded in front of a built-in upstream, seed three tenants (one on a
    deliberately tight plan), drive traffic past their limits, and print what was allowed,
    limited and metered. Stops by itself. (Gateway log: <data dir>/demo-serve.log.)"""
    settings = _settings(ctx)
    config: Path | None = ctx.find_root().obj
    if config is not None:
        os.environ["TOLLWAY_CONFIG"] = str(config.resolve())
    rows: list[dict[str, Any]] = []
    with _reporting(as_json):
        prepared = server.prepare(settings, 1)
        log_path = settings.data_dir / "demo-serve.log"
        with demo_run.upstream() as upstream_url:
            os.environ["TOLLWAY_UPSTREAM"] = upstream_url
            with (
                server.background_server(port or _free_port(), log_path) as base_url,
                _control_plane(ctx, as_json) as cp,
            ):
                actor = bootstrap.cli_actor()
                plans.apply(cp, demo_run.DEMO_PLAN, actor)
                with cli_output.progress() as bar:
                    task = bar.add_task("creating tenants", total=len(demo_run.DEMO_TENANTS))
                    for name, email, plan in demo_run.DEMO_TENANTS:
                        bar.update(task, description=f"creating {name}")
                        tenant = tenants.create(cp, actor=actor, name=name, email=email,
                                                plan=plan)
                        record, secret = keys.create(cp, tenant["id"], actor=actor,
                                                     name="demo")
                        rows.append({"tenant_id": tenant["id"], "name": name, "plan": plan,
                                     "status": tenant["status"], "key_id": record["id"],
                                     "secret": secret})
                        bar.advance(task)
                reader, token = admin_tokens.create(
                    cp, actor=actor, name="demo-reader", role=admin_tokens.PLATFORM,
                    expires_at=datetime.now(UTC) + timedelta(minutes=10))
                try:
                    with cli_output.progress() as bar:
                        bar.add_task("driving traffic and waiting for metering", total=None)
                        outcomes = demo_run.run_traffic(base_url, token, rows)
                finally:
                    admin_tokens.revoke(cp, reader["id"], actor=actor)
    traffic = [o.as_dict() for o in outcomes]
    result = {"gateway": base_url, "upstream": upstream_url,
              "backends": prepared.backends.as_dict(), "admin_token": prepared.new_token,
              "tenants": rows, "traffic": traffic}
    if as_json:
        cli_output.emit_json(result)
        return
    cli_output.table("demo tenants (key secrets are shown once)",
                     ("tenant_id", "name", "plan", "status", "secret"), rows)
    cli_output.table(
        "traffic through the gateway, and what ClickHouse metered",
        ("tenant_id", "plan", "allowed", "limited", "limited_by", "api_calls", "tokens",
         "ai_interactions"),
        [{**t, "limited_by": _pairs(t["limited_by"]),
          **{m: t["metered"].get(m, "0") for m in ("api_calls", "tokens", "ai_interactions")}}
         for t in traffic],
    )
    cli_output.err().print(f"the demo gateway ran at {base_url} and has stopped")
    if prepared.new_token is not None:
        cli_output.secret_notice("platform admin token (first start)", prepared.new_token)


def _pairs(doc: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(doc.items())) or "-"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# usage (read from ClickHouse with the functions the admin API uses)


@dataclass(frozen=True)
class _TenantUsage:
    tenant_id: str
    timezone: str
    plan: plans.Plan
    catalogue: list[plans.Plan]
    meters: dict[str, Meter]
    client: Client


@contextmanager
def _tenant_usage(ctx: typer.Context, tenant_id: str, as_json: bool) -> Iterator[_TenantUsage]:
    """The tenant (404 if unknown), its plan and the meters, with a ClickHouse client; an
    embedded chDB is migrated first, as every embedded install migrates itself."""
    from clickhouse_connect.driver.exceptions import Error as ClickHouseError

    from metering import clickhouse
    from metering.meters import load_meters

    with _control_plane(ctx, as_json) as cp:
        with cp.engine.connect() as conn:
            tenant = tenants.get(conn, tenant_id)
            plan = plans.load(conn, tenant["plan_id"], tenant["plan_version"])
            catalogue = plans.list_plans(conn)
        try:
            yield _TenantUsage(tenant_id, tenant["timezone"], plan, catalogue,
                               load_meters(cp.settings), _analytics_client(cp.settings))
        except ClickHouseError as exc:
            raise Problem(503, f"ClickHouse: {_first_line(exc)}", kind="analytics-unavailable"
                          ) from None
        finally:
            clickhouse.close()


def _analytics_client(settings: Settings, *, readonly: bool = False) -> Client:
    """The ClickHouse client (a read-only session if asked); failing to open it is a 503."""
    from clickhouse_connect.driver.exceptions import Error as ClickHouseError

    from metering import clickhouse
    from metering.migrations import migrate as migrate_clickhouse

    embedded = clickhouse.is_chdb(settings)
    try:
        if embedded:
            migrate_clickhouse(clickhouse.connect(settings), settings)
        return clickhouse.readonly_client(settings) if readonly else clickhouse.connect(settings)
    except ClickHouseError as exc:
        hint = (" (embedded chDB is opened by one process at a time: is `tollway serve` or "
                "`tollway worker` running on this data directory?)" if embedded else "")
        raise Problem(503, f"cannot open ClickHouse: {_first_line(exc)}{hint}",
                      kind="analytics-unavailable") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def _bad_value(option: str) -> Iterator[None]:
    """A value an option cannot take is a usage error (exit 2), as click reports its own;
    the problem's field, when it names one, says which option."""
    try:
        yield
    except Problem as exc:
        fields = [e.get("field") for e in exc.extra.get("errors", ()) if e.get("field")]
        hint = "--" + str(fields[0]).replace("_", "-") if fields else option
        raise typer.BadParameter(exc.detail, param_hint=hint) from None


def _meter(found: _TenantUsage, name: str) -> Meter:
    if name not in found.meters:
        known = ", ".join(sorted(found.meters))
        raise typer.BadParameter(f"unknown meter {name!r}; known: {known}", param_hint="--meter")
    return found.meters[name]


def _local(at: datetime, tz: str) -> str:
    from metering.usage import zone

    return f"{at.astimezone(zone(tz)):%Y-%m-%d %H:%M}"


def _month_name(start: datetime, tz: str) -> str:
    from metering.usage import zone

    return f"{start.astimezone(zone(tz)):%B %Y}"


def _normalized(used: dict[str, Decimal]) -> dict[str, Decimal]:
    return {name: amount.normalize() for name, amount in used.items()}


Tz = Annotated[str | None, typer.Option("--tz", help="IANA timezone (default: the tenant's).")]
From = Annotated[str | None, typer.Option(
    "--from", help="Start: YYYY-MM-DD (local midnight) or ISO timestamp with offset.")]
To = Annotated[str | None, typer.Option("--to", help="End (exclusive), as --from.")]
Period = Annotated[str | None, typer.Option(help="YYYY-MM (default: this month).")]


@usage_app.command("show")
def usage_show(
    ctx: typer.Context,
    tenant_id: str,
    meter: Annotated[list[str] | None, typer.Option(help="Meter (repeatable; default all).")]
    = None,
    window: Annotated[str, typer.Option(help="minute, hour, day or month.")] = "day",
    start: From = None,
    end: To = None,
    tz: Tz = None,
    group_by: Annotated[list[str] | None, typer.Option(
        help="Dimension the meter declares, e.g. route (repeatable).")] = None,
    as_json: Json = False,
) -> None:
    """A tenant's usage per meter and window, in a timezone, grouped by dimensions.

    The range defaults to this month in the timezone."""
    from metering import usage
    from metering.usage_api import _range

    if window not in usage.WINDOWS:
        raise typer.BadParameter(f"use one of {', '.join(usage.WINDOWS)}", param_hint="--window")
    dims = group_by or []
    with _tenant_usage(ctx, tenant_id, as_json) as found:
        zone = tz or found.timezone
        with _bad_value("--tz"):
            usage.zone(zone)
        with _bad_value("--from/--to"):
            lo, hi = _range(start, end, zone)
        chosen = [_meter(found, m) for m in meter or ()] or list(found.meters.values())
        series = []
        for m in chosen:
            with _bad_value("--group-by"):
                rows = usage.usage(found.client, m, tenant_id, lo, hi, window, zone, dims)
            series.append((m, [replace(r, value=r.value.normalize()) for r in rows]))
    if as_json:
        cli_output.emit_json({
            "tenant_id": tenant_id, "from": lo, "to": hi, "window": window, "tz": zone,
            "series": [{"meter": m.name, "aggregation": m.aggregation, "rows": rows}
                       for m, rows in series],
        })
        return
    flat = [{"meter": m.name, "period_start": r.period_start.isoformat(), **r.dims,
             "value": r.value} for m, rows in series for r in rows]
    cli_output.table(f"usage of {tenant_id} per {window}, {_local(lo, zone)} to "
                     f"{_local(hi, zone)} {zone}", ("meter", "period_start", *dims, "value"), flat)


@usage_app.command("totals")
def usage_totals(ctx: typer.Context, tenant_id: str, period: Period = None,
                 as_json: Json = False) -> None:
    """Every meter's total for a billing period, against the plan's quotas.

    A period is a calendar month in the tenant's timezone."""
    from metering import usage
    from metering.usage_api import _month

    with _tenant_usage(ctx, tenant_id, as_json) as found:
        with _bad_value("--period"):
            start, end = _month(period, found.timezone)
        used = _normalized(usage.totals(found.client, found.meters.values(), tenant_id,
                                        start, end))
    quotas = usage.quota_summary(used, found.plan.quotas, end)
    if as_json:
        cli_output.emit_json({"tenant_id": tenant_id, "plan": found.plan.plan_id, "from": start,
                              "to": end, "totals": used, "quotas": quotas})
        return
    limits = {line.meter: line for line in quotas}
    rows = [{"meter": name, "used": amount,
             "quota": limits[name].limit if name in limits else None,
             "percent": limits[name].percent if name in limits else None}
            for name, amount in sorted(used.items())]
    cli_output.table(f"usage of {tenant_id} in {_month_name(start, found.timezone)} "
                     f"({found.timezone})", ("meter", "used", "quota", "percent"), rows)


@usage_app.command("correct")
def usage_correct(
    ctx: typer.Context,
    tenant_id: str,
    meter: Annotated[str, typer.Option(help="The meter to correct.")],
    units: Annotated[str, typer.Option(help="Signed units to add, e.g. -120 or 3.5.")],
    at: Annotated[str, typer.Option(
        help="When the corrected usage happened (ISO timestamp with offset); the correction "
             "lands in that period.")],
    reason: Annotated[str, typer.Option(help="Why (kept on the row as dims.reason).")],
    correction_id: Annotated[str | None, typer.Option(
        "--id", help="Idempotency id: running again with the same id adds nothing.")] = None,
    as_json: Json = False,
) -> None:
    """Correct a tenant's usage with a new row. Raw events are never changed or deleted: a
    correction is a row with source 'correction' and signed units, and every query and
    rollup of its period includes it."""
    import uuid

    from metering.events import MAX_DIM_LEN, UsageEvent, uuid7
    from metering.ingest import insert_events

    try:
        amount = Decimal(units)
    except ArithmeticError:
        raise typer.BadParameter(f"{units!r} is not a number", param_hint="--units") from None
    if not amount.is_finite() or amount == 0:
        raise typer.BadParameter("units must be a finite, non-zero number",
                                 param_hint="--units")
    try:
        when = datetime.fromisoformat(at)
    except ValueError:
        raise typer.BadParameter(f"{at!r} is not an ISO timestamp", param_hint="--at") from None
    if when.tzinfo is None:
        raise typer.BadParameter("give the timestamp's UTC offset, e.g. 2026-11-02T10:00:00Z",
                                 param_hint="--at")
    if when > datetime.now(UTC) + timedelta(minutes=5):
        raise typer.BadParameter("a correction cannot be for the future", param_hint="--at")
    if not 0 < len(reason.strip()) <= MAX_DIM_LEN:
        raise typer.BadParameter(f"reason must be 1 to {MAX_DIM_LEN} characters",
                                 param_hint="--reason")
    # A given --id always maps to the same event id and insert token, so ClickHouse drops a
    # repeat of the same correction instead of counting it twice.
    event_id = (str(uuid.uuid5(uuid.NAMESPACE_URL, f"tollway:correction:{tenant_id}:"
                               f"{correction_id}")) if correction_id else uuid7())
    with _tenant_usage(ctx, tenant_id, as_json) as found:
        _meter(found, meter)
        event = UsageEvent(tenant_id, meter, bootstrap.cli_actor(),
                           int(when.timestamp() * 1000), amount, dims={"reason": reason.strip()},
                           event_id=event_id)
        insert_events(found.client, [event], "correction", f"correction:{event_id}")
    result = {"tenant_id": tenant_id, "meter": meter, "units": amount, "at": when,
              "event_id": event_id, "reason": reason.strip()}
    if as_json:
        cli_output.emit_json(result)
        return
    cli_output.err().print(f"corrected {meter} of {tenant_id} by {amount} at {when.isoformat()} "
                           f"(event {event_id})")


@usage_app.command("quota")
def usage_quota(ctx: typer.Context, tenant_id: str, as_json: Json = False) -> None:
    """This month's use of each quota in the tenant's plan, and when the quotas reset."""
    from metering import usage

    with _tenant_usage(ctx, tenant_id, as_json) as found:
        start, end = usage.month_bounds(datetime.now(UTC), found.timezone)
        quota_meters = [found.meters[m] for m in found.plan.quotas if m in found.meters]
        used = _normalized(usage.totals(found.client, quota_meters, tenant_id, start, end))
    lines = usage.quota_summary(used, found.plan.quotas, end)
    if as_json:
        cli_output.emit_json({"tenant_id": tenant_id, "plan": found.plan.plan_id, "from": start,
                              "to": end, "quotas": lines})
        return
    cli_output.table(f"quotas of {tenant_id} on {found.plan.plan_id}, reset at "
                     f"{_local(end, found.timezone)} {found.timezone}",
                     ("meter", "used", "limit", "percent"), map(asdict, lines))


@usage_app.command("report")
def usage_report(ctx: typer.Context, tenant_id: str, period: Period = None,
                 as_json: Json = False) -> None:
    """Every meter's total for a month against the month before."""
    from metering import usage
    from metering.usage_api import _month

    with _tenant_usage(ctx, tenant_id, as_json) as found:
        with _bad_value("--period"):
            start, end = _month(period, found.timezone)
        prev_start, prev_end = usage.previous_month(start, found.timezone)
        meters = list(found.meters.values())
        current = _normalized(usage.totals(found.client, meters, tenant_id, start, end))
        previous = _normalized(usage.totals(found.client, meters, tenant_id, prev_start,
                                            prev_end))
    lines = usage.compare(current, previous)
    if as_json:
        cli_output.emit_json({"tenant_id": tenant_id, "from": start, "to": end,
                              "previous": {"from": prev_start, "to": prev_end}, "lines": lines})
        return
    cli_output.table(f"usage of {tenant_id} in {_month_name(start, found.timezone)} against "
                     f"{_month_name(prev_start, found.timezone)} ({found.timezone})",
                     ("meter", "current", "previous", "change", "change_percent"),
                     map(asdict, lines))


@usage_app.command("export")
def usage_export(
    ctx: typer.Context,
    tenant_id: str,
    out: Annotated[Path, typer.Option("--out", dir_okay=False, help="File to write.")],
    fmt: Annotated[str, typer.Option("--format", help="csv or parquet.")] = "csv",
    start: From = None,
    end: To = None,
    tz: Tz = None,
    as_json: Json = False,
) -> None:
    """Daily usage facts per meter, route, method, status and dims, as CSV or Parquet.

    What finance reconciles against. The file appears whole or not at all."""
    from metering.export import FORMATS, export_usage
    from metering.usage import zone as check_zone
    from metering.usage_api import _range

    if fmt not in FORMATS:
        raise typer.BadParameter("use csv or parquet", param_hint="--format")
    if not out.parent.is_dir():
        raise typer.BadParameter(f"directory {out.parent} does not exist", param_hint="--out")
    with _tenant_usage(ctx, tenant_id, as_json) as found, cli_output.progress() as bar:
        zone = tz or found.timezone
        with _bad_value("--tz"):
            check_zone(zone)
        with _bad_value("--from/--to"):
            lo, hi = _range(start, end, zone)
        task = bar.add_task("querying ClickHouse", total=2)
        body = export_usage(found.client, tenant_id, lo, hi, zone, cast("Format", fmt))
        bar.advance(task)
        bar.update(task, description=f"writing {out.name}")
        part = out.with_name(f".{out.name}.part")
        part.write_bytes(body)
        part.replace(out)
        bar.advance(task)
    result = {"tenant_id": tenant_id, "format": fmt, "path": str(out.resolve()),
              "bytes": len(body),
              "from": lo, "to": hi, "tz": zone}
    if as_json:
        cli_output.emit_json(result)
    else:
        cli_output.out().print(f"wrote {len(body):,} bytes of {fmt} to {out} ({_local(lo, zone)}"
                               f" to {_local(hi, zone)} {zone})", highlight=False)


@usage_app.command("analytics")
def usage_analytics(
    ctx: typer.Context,
    tenant_id: str,
    meter: Annotated[str, typer.Option(help="Meter to analyse.")] = "api_calls",
    threshold: Annotated[float, typer.Option(min=0.5, max=10, help="Anomaly z-score.")] = 2.0,
    baseline_hours: Annotated[int, typer.Option(min=24, max=24 * 28,
                                                help="Trailing baseline, hours.")] = 168,
    as_json: Json = False,
) -> None:
    """Anomalous hours, a 7-day forecast and plan-fit advice for one meter.

    An hour of the last 7 days is anomalous beyond --threshold standard deviations of the
    trailing baseline; the advice carries the monthly price difference."""
    from metering import analytics

    with _tenant_usage(ctx, tenant_id, as_json) as found:
        chosen = _meter(found, meter)
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        history = now - timedelta(hours=baseline_hours + 7 * 24)
        series = analytics.hourly_series(found.client, chosen, tenant_id, history, now)
        anomalies = [a for a in analytics.anomalies(series, baseline_hours, threshold,
                                                    min(24, baseline_hours))
                     if a.at >= now - timedelta(days=7)]
        ahead = analytics.forecast(series[-14 * 24:], 7 * 24)
        advice = _plan_fit(found)
    doc = {"tenant_id": tenant_id, "meter": chosen.name, "threshold": threshold,
           "baseline_hours": baseline_hours, "anomalies": anomalies,
           "forecast": {"hourly": ahead, "total_7d": round(sum(p.value for p in ahead), 6)},
           "plan_fit": advice}
    if as_json:
        cli_output.emit_json(doc)
        return
    cli_output.record(f"{chosen.name} of {tenant_id}", {
        "anomalous hours (last 7 days)": len(anomalies),
        "rule": f"over {threshold}σ from the mean of the trailing {baseline_hours} h",
        "forecast (7 days)": round(sum(p.value for p in ahead), 2),
        "plan fit": advice.action + (f" to {advice.plan_id}" if advice.plan_id else ""),
        "monthly price difference": advice.monthly_price_difference,
        "peak quota utilization": f"{advice.peak:.0%}" if advice.peak.is_finite() else "over",
        "why": advice.reason,
    })
    if anomalies:
        cli_output.table("anomalous hours (UTC)", ("at", "value", "expected", "z"),
                         ({"at": f"{a.at:%Y-%m-%d %H:%M}", "value": round(a.value, 2),
                           "expected": round(a.expected, 2), "z": round(a.z, 2)}
                          for a in anomalies))
    days = [ahead[i:i + 24] for i in range(0, len(ahead), 24)]
    cli_output.table("forecast per 24 h", ("from (UTC)", chosen.name),
                     ({"from (UTC)": f"{day[0].at:%Y-%m-%d %H:%M}",
                       chosen.name: round(sum(p.value for p in day), 2)} for day in days))


def _plan_fit(found: _TenantUsage) -> Advice:
    """As the admin API: fit on the larger of last month and this month projected to its end."""
    from metering import analytics, usage

    now = datetime.now(UTC)
    start, end = usage.month_bounds(now, found.timezone)
    prev_start, prev_end = usage.previous_month(start, found.timezone)
    quota_meters = [found.meters[m] for m in found.plan.quotas if m in found.meters]
    so_far = usage.totals(found.client, quota_meters, found.tenant_id, start, end)
    last = usage.totals(found.client, quota_meters, found.tenant_id, prev_start, prev_end)
    elapsed = Decimal(max((now - start).total_seconds(), 3600) / (end - start).total_seconds())
    used = {m: max(last.get(m, Decimal(0)), v / elapsed) for m, v in so_far.items()}
    options = [analytics.PlanOption(p.plan_id, p.name, p.price, p.quotas)
               for p in found.catalogue]
    current = analytics.PlanOption(found.plan.plan_id, found.plan.name, found.plan.price,
                                   found.plan.quotas)
    return analytics.plan_fit(current, options, used)


# read-only SQL and analyst logins


@app.command()
def sql(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="One SELECT, WITH, SHOW, DESCRIBE or EXISTS.")],
    fmt: Annotated[str, typer.Option("--format", help="table or csv.")] = "table",
    as_json: Json = False,
) -> None:
    """Run one read-only SQL query on the usage data.

    The session is kept read-only by ClickHouse itself; at most 100,000 rows and 30 s."""
    from clickhouse_connect.driver.exceptions import Error as ClickHouseError

    from metering import clickhouse
    from metering.readonly_sql import run_readonly

    if fmt not in ("table", "csv"):
        raise typer.BadParameter("use table or csv", param_hint="--format")
    settings = _settings(ctx)
    with _reporting(as_json):
        try:
            columns, rows = run_readonly(_analytics_client(settings, readonly=True), query)
        except ClickHouseError as exc:
            raise Problem(400, _first_line(exc), kind="query-failed") from None
        finally:
            clickhouse.close()
    plain = [[cli_output.jsonable(v) for v in row] for row in rows]
    if as_json:
        cli_output.emit_json({"columns": columns, "rows": plain})
    elif fmt == "csv":
        cli_output.csv_rows(columns, plain)
    else:
        cli_output.table(f"{len(plain)} row{'' if len(plain) == 1 else 's'}", columns,
                         (dict(zip(columns, row, strict=True)) for row in plain))


@analysts_app.command("create")
def analysts_create(
    ctx: typer.Context,
    tenant_id: str,
    user: Annotated[str, typer.Option(help="ClickHouse user name (an identifier).")],
    as_json: Json = False,
) -> None:
    """Create a read-only ClickHouse user who sees only this tenant's rows.

    Row policies on every usage table; the generated password is printed once. Needs a
    ClickHouse server (chDB has no users)."""
    from clickhouse_connect.driver.exceptions import Error as ClickHouseError

    from metering import clickhouse
    from metering.readonly_sql import analyst_statements, create_analyst

    password = secrets.token_urlsafe(32)
    with _control_plane(ctx, as_json) as cp:
        with cp.engine.connect() as conn:
            tenants.get(conn, tenant_id)
        analyst_statements(tenant_id, user, password)  # validates before anything runs
        if clickhouse.is_chdb(cp.settings):
            raise Problem(501, "analyst logins need a ClickHouse server (set "
                          "TOLLWAY_CLICKHOUSE_URL); embedded chDB has no users or row policies."
                          " Use `tollway sql` for read-only queries.",
                          kind="needs-clickhouse-server")
        try:
            ran = create_analyst(clickhouse.connect(cp.settings), tenant_id, user, password)
        except ClickHouseError as exc:
            raise Problem(502, f"ClickHouse refused: {_first_line(exc)}",
                          kind="analytics-refused") from None
        finally:
            clickhouse.close()
    if as_json:
        cli_output.emit_json({"tenant_id": tenant_id, "user": user, "password": password,
                              "statements": ran})
    else:
        cli_output.secret_notice(f"password of ClickHouse user {user} ({tenant_id})", password)


# tenants


@tenants_app.command("create")
def tenants_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Display name.")],
    email: Annotated[str, typer.Option(help="Billing/contact email.")],
    plan: Annotated[str | None, typer.Option(help="Plan id (default: settings).")] = None,
    upstream: Annotated[str | None, typer.Option(help="This tenant's upstream URL.")] = None,
    domain: Annotated[list[str] | None, typer.Option(help="Custom domain (repeatable).")] = None,
    subdomain: Annotated[str | None, typer.Option(help="Subdomain label.")] = None,
    region: Annotated[str | None, typer.Option(help="Data region.")] = None,
    timezone: Annotated[str, typer.Option(help="IANA timezone for quotas.")] = "UTC",
    currency: Annotated[str, typer.Option(help="ISO 4217 billing currency.")] = "USD",
    locale: Annotated[str, typer.Option(help="BCP 47 locale.")] = "en-US",
    as_json: Json = False,
) -> None:
    """Onboard a tenant; prints only its id (or the whole tenant with --json)."""
    with _control_plane(ctx, as_json) as cp:
        tenant = tenants.create(
            cp, actor=bootstrap.cli_actor(), name=name, email=email, plan=plan, region=region,
            locale=locale, timezone=timezone, currency=currency, subdomain=subdomain,
            domains=domain or (), upstream=upstream,
        )
    if as_json:
        cli_output.emit_json(tenant)
    else:
        cli_output.line(tenant["id"])


@tenants_app.command("list")
def tenants_list(
    ctx: typer.Context,
    q: Annotated[str | None, typer.Option("--q", "--search", help="Search name/id/email.")] = None,
    status: Annotated[str | None, typer.Option(help="Lifecycle status.")] = None,
    plan: Annotated[str | None, typer.Option(help="Plan id.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Page size.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of the previous page.")] = None,
    as_json: Json = False,
) -> None:
    """List tenants, newest first."""
    with _control_plane(ctx, as_json) as cp, cp.engine.connect() as conn:
        items, next_cursor = tenants.list_tenants(
            conn, q=q, status=status, plan=plan, limit=limit, cursor=cursor
        )
    if as_json:
        cli_output.emit_json({"items": items, "next_cursor": next_cursor})
        return
    cli_output.table(f"tenants ({len(items)})", TENANT_COLUMNS, items)
    if next_cursor:
        cli_output.err().print(f"more: --cursor {next_cursor}", highlight=False)


@tenants_app.command("show")
def tenants_show(ctx: typer.Context, tenant_id: str, as_json: Json = False) -> None:
    """Show one tenant."""
    with _control_plane(ctx, as_json) as cp, cp.engine.connect() as conn:
        tenant = tenants.get(conn, tenant_id)
    if as_json:
        cli_output.emit_json(tenant)
    else:
        cli_output.record(f"tenant {tenant_id}", tenant)


class ImportFormat(StrEnum):
    csv = "csv"
    jsonl = "jsonl"


@tenants_app.command("import")
def tenants_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSON Lines or CSV (name,email,plan[,subdomain,"
                                              "domain,upstream]).", dir_okay=False)],
    with_keys: Annotated[bool, typer.Option("--with-keys", help="Give each tenant a key.")]
    = False,
    keys_out: Annotated[Path | None, typer.Option(
        help="New file (mode 0600) for the secrets, one JSON line per key.", dir_okay=False)]
    = None,
    fmt: Annotated[ImportFormat | None, typer.Option(
        "--format", help="Input format (default: by extension, .csv or JSON Lines).")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, max=32, help="Concurrent transactions (default: 4 on PostgreSQL, 1 on SQLite).")]
    = None,
    as_json: Json = False,
) -> None:
    """Onboard many tenants, each in its own transaction with its key (--with-keys).

    Prints the new ids (with --json: a summary, with the secrets unless --keys-out holds
    them). An entry that is refused fails alone; exit 1 if any did.
    """
    if keys_out is not None and not with_keys:
        raise typer.BadParameter("only --with-keys makes secrets to write", param_hint="--keys-out")
    if with_keys and keys_out is None and not as_json:
        raise typer.BadParameter(
            "say where the secrets go: --keys-out FILE, or --json for stdout",
            param_hint="--with-keys",
        )
    with _reporting(as_json):
        entries = onboarding.read_file(file, fmt.value if fmt else None)
    with _control_plane(ctx, as_json) as cp, _secrets_file(keys_out) as sink:
        bar = cli_output.progress()

        def done(outcome: onboarding.Outcome) -> None:
            if sink is not None and outcome.secret is not None:
                sink.write(_key_line(entries[outcome.index].line, outcome))
                sink.flush()
            bar.advance(task)

        with bar:
            task = bar.add_task(f"importing {file.name}", total=len(entries))
            outcomes = onboarding.onboard(
                cp, [e.spec for e in entries], actor=bootstrap.cli_actor(), with_keys=with_keys,
                workers=workers, progress=done,
            )
    created = [o for o in outcomes if o.tenant is not None]
    failed = [(entries[o.index].line, o.problem) for o in outcomes if o.problem is not None]
    for _, problem in failed:
        if "earlier_entry" in problem.extra:  # an index means nothing to the file's author
            problem.extra["earlier_line"] = entries[problem.extra.pop("earlier_entry")].line
            problem.detail += f" (line {problem.extra['earlier_line']})"
    if as_json:
        cli_output.emit_json({
            "created": len(created),
            "failed": len(failed),
            "keys_out": None if keys_out is None else str(keys_out),
            "tenants": [_imported(entries[o.index].line, o, keys_out is None) for o in created],
            "failures": [{"line": line, "problem": p.body()} for line, p in failed],
        })
    else:
        for outcome in created:
            cli_output.line((outcome.tenant or {})["id"])
        _import_summary(len(created), failed, keys_out)
    if failed:
        raise typer.Exit(1)


@contextmanager
def _secrets_file(path: Path | None) -> Iterator[Any]:
    """Created before the first tenant, never over an existing file: secrets are shown once,
    so a file that already holds some must not be clobbered."""
    if path is None:
        yield None
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise typer.BadParameter(f"{path} exists; refusing to overwrite it",
                                 param_hint="--keys-out") from None
    except OSError as exc:
        raise typer.BadParameter(f"cannot create {path}: {exc.strerror}",
                                 param_hint="--keys-out") from None
    sink = os.fdopen(fd, "w", encoding="utf-8")
    try:
        yield sink
    finally:
        sink.flush()
        os.fsync(sink.fileno())
        empty = sink.tell() == 0
        sink.close()
        if empty:  # nothing was created: leave no file that would block the rerun
            path.unlink()


def _key_line(line: int, outcome: onboarding.Outcome) -> str:
    tenant, key = outcome.tenant or {}, outcome.key or {}
    doc = {"line": line, "tenant_id": tenant["id"], "name": tenant["name"], "key_id": key["id"],
           "secret": outcome.secret}
    return orjson.dumps(doc).decode() + "\n"


def _imported(line: int, outcome: onboarding.Outcome, with_secret: bool) -> dict[str, Any]:
    tenant = outcome.tenant or {}
    doc = {"line": line, "id": tenant["id"], "name": tenant["name"]}
    if outcome.key is not None:
        doc |= {"key_id": outcome.key["id"], "key_prefix": outcome.key["prefix"]}
        if with_secret:
            doc["secret"] = outcome.secret
    return doc


def _import_summary(created: int, failed: list[tuple[int, Problem]], keys_out: Path | None
                    ) -> None:
    console = cli_output.err()
    where = f"; their keys' secrets are in {keys_out} (shown once)" if keys_out else ""
    console.print(f"[bold green]created {created}[/]{where}", highlight=False)
    if failed:
        console.print(f"[bold red]failed {len(failed)}:[/]", highlight=False)
    for line, problem in failed:
        console.print(f"  line {line}: {problem.detail}", highlight=False, soft_wrap=True)


def _transition(ctx: typer.Context, tenant_id: str, action: str, reason: str | None,
                as_json: bool) -> None:
    with _control_plane(ctx, as_json) as cp:
        tenant = tenants.transition(cp, tenant_id, action, actor=bootstrap.cli_actor(),
                                    reason=reason)
    if as_json:
        cli_output.emit_json(tenant)
    else:
        cli_output.out().print(f"{tenant_id}: {tenant['status']}")


Reason = Annotated[str | None, typer.Option(help="Why (kept in the audit log).")]


@tenants_app.command("suspend")
def tenants_suspend(ctx: typer.Context, tenant_id: str, reason: Reason = None,
                    as_json: Json = False) -> None:
    """Stop serving a tenant's traffic until it is reactivated."""
    _transition(ctx, tenant_id, "suspend", reason, as_json)


@tenants_app.command("reactivate")
def tenants_reactivate(ctx: typer.Context, tenant_id: str, reason: Reason = None,
                       as_json: Json = False) -> None:
    """Serve a suspended, past-due or cancelled (in grace) tenant again."""
    _transition(ctx, tenant_id, "reactivate", reason, as_json)


@tenants_app.command("cancel")
def tenants_cancel(ctx: typer.Context, tenant_id: str, reason: Reason = None,
                   as_json: Json = False) -> None:
    """Cancel a tenant; it is deprovisioned after the grace period."""
    _transition(ctx, tenant_id, "cancel", reason, as_json)


@tenants_app.command("activate")
def tenants_activate(ctx: typer.Context, tenant_id: str, reason: Reason = None,
                     as_json: Json = False) -> None:
    """End a tenant's trial early and make it a paying tenant."""
    _transition(ctx, tenant_id, "activate", reason, as_json)


@tenants_app.command("set-plan")
def tenants_set_plan(
    ctx: typer.Context,
    tenant_id: str,
    plan: str,
    version: Annotated[int | None, typer.Option(min=1, help="Plan version (default latest).")]
    = None,
    as_json: Json = False,
) -> None:
    """Move a tenant to another plan."""
    with _control_plane(ctx, as_json) as cp:
        tenant = tenants.change_plan(cp, tenant_id, plan, actor=bootstrap.cli_actor(),
                                     version=version)
    if as_json:
        cli_output.emit_json(tenant)
    else:
        cli_output.out().print(f"{tenant_id}: {tenant['plan_id']} v{tenant['plan_version']}")


# keys


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    tenant_id: str,
    name: Annotated[str, typer.Option(help="Label for the key.")] = "default",
    scope: Annotated[list[str] | None, typer.Option(help="Scope (repeatable).")] = None,
    mode: Annotated[str | None, typer.Option(help="live or test.")] = None,
    expires_at: Annotated[str | None, typer.Option(help="ISO 8601 expiry.")] = None,
    as_json: Json = False,
) -> None:
    """Create an API key; prints the secret once (with --json: the record and `secret`)."""
    expiry = _when(expires_at, "--expires-at")
    with _control_plane(ctx, as_json) as cp:
        record, secret = keys.create(cp, tenant_id, actor=bootstrap.cli_actor(), name=name,
                                     scopes=scope or ("*",), mode=mode, expires_at=expiry)
    if as_json:
        cli_output.emit_json({**record, "secret": secret})
    else:
        cli_output.secret_notice(f"API key {record['id']}", secret)


@keys_app.command("list")
def keys_list(ctx: typer.Context, tenant_id: str, as_json: Json = False) -> None:
    """List a tenant's keys (never their secrets)."""
    with _control_plane(ctx, as_json) as cp, cp.engine.connect() as conn:
        items = keys.list_keys(conn, tenant_id)
    if as_json:
        cli_output.emit_json({"items": items})
    else:
        cli_output.table(f"keys of {tenant_id}", KEY_COLUMNS, items)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: str, as_json: Json = False) -> None:
    """Revoke a key at once."""
    with _control_plane(ctx, as_json) as cp:
        record = keys.revoke(cp, key_id, actor=bootstrap.cli_actor())
    if as_json:
        cli_output.emit_json(record)
    else:
        cli_output.out().print(f"{key_id}: revoked at {record['revoked_at']}")


@keys_app.command("rotate")
def keys_rotate(
    ctx: typer.Context,
    key_id: str,
    overlap_hours: Annotated[float, typer.Option(min=0, help="How long the old key stays valid.")]
    = 24.0,
    as_json: Json = False,
) -> None:
    """Replace a key; the old one keeps working for the overlap. Prints the new secret once."""
    with _control_plane(ctx, as_json) as cp:
        record, secret = keys.rotate(cp, key_id, actor=bootstrap.cli_actor(),
                                     overlap=timedelta(hours=overlap_hours))
    if as_json:
        cli_output.emit_json({**record, "secret": secret})
    else:
        cli_output.secret_notice(f"API key {record['id']} (replaces {key_id})", secret)


# plans


@plans_app.command("apply")
def plans_apply(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="TOML/YAML/JSON.")],
    as_json: Json = False,
) -> None:
    """Apply a plans file; a plan whose content changed gets a new version."""
    with _control_plane(ctx, as_json) as cp:
        results = plans.apply(cp, path, actor=bootstrap.cli_actor())
    if as_json:
        cli_output.emit_json({"plans": results})
    else:
        cli_output.table(f"applied {path}", ("plan_id", "version", "created"), results)


@plans_app.command("list")
def plans_list(ctx: typer.Context, as_json: Json = False) -> None:
    """List plans (latest version of each)."""
    with _control_plane(ctx, as_json) as cp, cp.engine.connect() as conn:
        items = plans.list_plans(conn)
    if as_json:
        cli_output.emit_json({"items": items})
        return
    rows = [{"plan_id": p.plan_id, "version": p.version, "name": p.name, "price": p.price,
             "currency": p.currency, "rate/s": p.rate_per_second, "burst": p.burst,
             "concurrency": p.concurrency, "quotas": p.quotas} for p in items]
    cli_output.table("plans", ("plan_id", "version", "name", "price", "currency", "rate/s",
                               "burst", "concurrency", "quotas"), rows)


@plans_app.command("show")
def plans_show(
    ctx: typer.Context,
    plan_id: str,
    version: Annotated[int | None, typer.Option(min=1, help="Version (default latest).")] = None,
    as_json: Json = False,
) -> None:
    """Show one plan."""
    with _control_plane(ctx, as_json) as cp, cp.engine.connect() as conn:
        plan = plans.load(conn, plan_id, version)
    if as_json:
        cli_output.emit_json(plan)
    else:
        cli_output.record(f"plan {plan_id} v{plan.version}", asdict(plan))


# admin tokens


@tokens_app.command("create")
def tokens_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="Who or what uses the token.")],
    role: Annotated[str, typer.Option(help="platform or tenant.")] = "platform",
    tenant: Annotated[str | None, typer.Option(help="Tenant id (role tenant).")] = None,
    expires_at: Annotated[str | None, typer.Option(help="ISO 8601 expiry.")] = None,
    as_json: Json = False,
) -> None:
    """Create an admin API token; prints the secret once (with --json: in `secret`)."""
    expiry = _when(expires_at, "--expires-at")
    with _control_plane(ctx, as_json) as cp:
        record, secret = admin_tokens.create(cp, actor=bootstrap.cli_actor(), name=name,
                                             role=role, tenant_id=tenant, expires_at=expiry)
    if as_json:
        cli_output.emit_json({**record, "secret": secret})
    else:
        cli_output.secret_notice(f"admin token {record['id']} ({role})", secret)


@tokens_app.command("list")
def tokens_list(ctx: typer.Context, as_json: Json = False) -> None:
    """List admin tokens (never their secrets)."""
    with _control_plane(ctx, as_json) as cp, cp.engine.connect() as conn:
        items = admin_tokens.list_tokens(conn)
    if as_json:
        cli_output.emit_json({"items": items})
    else:
        cli_output.table("admin tokens", ("id", "name", "role", "tenant_id", "created_at",
                                          "expires_at", "revoked_at"), items)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
