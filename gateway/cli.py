"""The `tollway` command line.

Commands talk to the control plane directly (not through the admin API), on the store the
settings name, so they work before any server runs; the embedded SQLite file is migrated on
first use. Every command takes `--json`. Exit codes: 0 success, 1 a refused operation (a
Problem), 2 a usage or configuration error.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway import bootstrap, cli_output, server
from tenancy import admin_tokens, keys, plans, tenants
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem
from tenancy.settings import Settings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Tollway: a tenant-aware metering gateway.")
tenants_app = typer.Typer(no_args_is_help=True, help="Create, inspect and change tenants.")
keys_app = typer.Typer(no_args_is_help=True, help="Tenant API keys.")
plans_app = typer.Typer(no_args_is_help=True, help="Plans and their versions.")
tokens_app = typer.Typer(no_args_is_help=True, help="Admin API tokens.")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(plans_app, name="plans")
app.add_typer(tokens_app, name="admin-tokens")

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
def worker(ctx: typer.Context, as_json: Json = False) -> None:
    """Run the metering consumer (Redis Streams to ClickHouse) until SIGTERM."""
    from metering.worker import main_worker

    settings = _settings(ctx)
    server.configure_logging(settings)
    if as_json:
        backends = bootstrap.backends(settings).as_dict()
        cli_output.emit_json({"worker": "started", "backends": backends})
    main_worker(settings)


DEMO_TENANTS = (
    ("Acme Robotics", "ops@acme.example", "starter"),
    ("Globex Analytics", "billing@globex.example", "professional"),
    ("Initech Cloud", "it@initech.example", "enterprise"),
)


@app.command()
def demo(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="Gateway port (default: a free one).")]
    = None,
    as_json: Json = False,
) -> None:
    """Start the gateway embedded, seed three tenants on different plans with API keys, print
    them, and stop. (Log of the demo gateway: <data dir>/demo-serve.log.)"""
    settings = _settings(ctx)
    config: Path | None = ctx.find_root().obj
    if config is not None:
        os.environ["TOLLWAY_CONFIG"] = str(config.resolve())
    rows: list[dict[str, Any]] = []
    with _reporting(as_json):
        prepared = server.prepare(settings, 1)
        log_path = settings.data_dir / "demo-serve.log"
        with (
            server.background_server(port or _free_port(), log_path) as base_url,
            _control_plane(ctx, as_json) as cp,
            cli_output.progress() as bar,
        ):
            task = bar.add_task("creating tenants", total=len(DEMO_TENANTS))
            for name, email, plan in DEMO_TENANTS:
                bar.update(task, description=f"creating {name}")
                tenant = tenants.create(cp, actor=bootstrap.cli_actor(), name=name,
                                        email=email, plan=plan)
                record, secret = keys.create(cp, tenant["id"], actor=bootstrap.cli_actor(),
                                             name="demo")
                rows.append({"tenant_id": tenant["id"], "name": name, "plan": plan,
                             "status": tenant["status"], "key_id": record["id"],
                             "secret": secret})
                bar.advance(task)
    result = {"gateway": base_url, "backends": prepared.backends.as_dict(),
              "admin_token": prepared.new_token, "tenants": rows}
    if as_json:
        cli_output.emit_json(result)
        return
    cli_output.table("demo tenants (key secrets are shown once)",
                     ("tenant_id", "name", "plan", "status", "secret"), rows)
    cli_output.err().print(f"the demo gateway ran at {base_url} and has stopped")
    if prepared.new_token is not None:
        cli_output.secret_notice("platform admin token (first start)", prepared.new_token)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@app.command("usage")
def usage_cmd(
    ctx: typer.Context,
    tenant_id: str,
    period: Annotated[str | None, typer.Option(help="YYYY-MM (default: this month).")] = None,
    as_json: Json = False,
) -> None:
    """A tenant's usage per meter for a calendar month (its timezone), against its quotas."""
    from metering import clickhouse, usage
    from metering.meters import load_meters
    from metering.migrations import migrate as migrate_clickhouse

    with _control_plane(ctx, as_json) as cp:
        with cp.engine.connect() as conn:
            tenant = tenants.get(conn, tenant_id)
            plan = plans.load(conn, tenant["plan_id"], tenant["plan_version"])
        try:
            month = (datetime.strptime(period, "%Y-%m") if period else datetime.now()).replace(
                day=15, tzinfo=usage.zone(tenant["timezone"]))
        except ValueError:
            raise typer.BadParameter("use YYYY-MM", param_hint="--period") from None
        start, end = usage.month_bounds(month, tenant["timezone"])
        meters = load_meters(cp.settings)
        try:
            client = clickhouse.connect(cp.settings)
            migrate_clickhouse(client, cp.settings)
            totals = usage.totals(client, meters.values(), tenant_id, start, end)
            used = {name: amount.normalize() for name, amount in totals.items()}
        finally:
            clickhouse.close()
    quotas = usage.quota_summary(used, plan.quotas, end)
    if as_json:
        cli_output.emit_json({"tenant_id": tenant_id, "plan": plan.plan_id, "from": start,
                              "to": end, "totals": used, "quotas": quotas})
        return
    limits = {line.meter: line for line in quotas}
    rows = [{"meter": name, "used": amount,
             "quota": limits[name].limit if name in limits else None,
             "percent": limits[name].percent if name in limits else None}
            for name, amount in sorted(used.items())]
    cli_output.table(f"usage of {tenant_id}, {start:%Y-%m-%d} to {end:%Y-%m-%d} (UTC)",
                     ("meter", "used", "quota", "percent"), rows)


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
