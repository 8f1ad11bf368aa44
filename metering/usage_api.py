"""Admin routes for one tenant's usage: series, quota, report, export, analytics.

The admin API mounts these under /admin/v1 behind its authentication middleware, which puts
the principal in the request state. Every handler takes the tenant from the path only and
checks it against the principal (tenancy.admin_auth.tenant_scope: a tenant admin asking for
another tenant gets 404). Plans and the tenant's timezone are read from the control plane
here, in the API layer; the query and analytics functions take plain values.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from metering import analytics, clickhouse, usage
from metering.analytics import Advice
from metering.export import FORMATS, export_usage
from metering.meters import Meter, load_meters
from tenancy import plans
from tenancy.admin_auth import principal_of, tenant_scope
from tenancy.admin_tokens import AdminPrincipal
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem, invalid, not_found, problem_response
from tenancy.tables import tenants

MAX_RANGE = timedelta(days=400)
Handler = Callable[[Request, "TenantContext"], Awaitable[Response]]


@dataclass(frozen=True)
class TenantContext:
    tenant_id: str
    timezone: str
    plan: plans.Plan


def usage_routes(cp: ControlPlane, meters: Mapping[str, Meter] | None = None) -> list[Route]:
    """Routes relative to the admin API root, each under /tenants/{tenant_id}/."""
    known = dict(meters) if meters is not None else load_meters(cp.settings)
    api = _UsageApi(cp, known)
    endpoints: dict[str, Handler] = {
        "usage": api.usage, "quota": api.quota, "report": api.report,
        "export": api.export, "analytics": api.analytics,
    }
    return [
        Route(f"/tenants/{{tenant_id}}/{name}", api.wrap(handler), methods=["GET"],
              name=f"metering-{name}")
        for name, handler in endpoints.items()
    ]


class _UsageApi:
    def __init__(self, cp: ControlPlane, meters: dict[str, Meter]) -> None:
        self.cp = cp
        self.meters = meters

    def wrap(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                tenant_id = request.path_params["tenant_id"]
                tenant_scope(_principal(request), tenant_id)
                ctx = await run_in_threadpool(self._tenant, tenant_id)
                return await handler(request, ctx)
            except Problem as problem:
                return problem_response(problem, request.url.path)

        return endpoint

    def _tenant(self, tenant_id: str) -> TenantContext:
        with self.cp.engine.connect() as conn:
            row = conn.execute(
                select(tenants.c.timezone, tenants.c.plan_id, tenants.c.plan_version)
                .where(tenants.c.id == tenant_id)
            ).first()
            if row is None:
                raise not_found("tenant", tenant_id)
            return TenantContext(tenant_id, row.timezone, plans.load(conn, row.plan_id,
                                                                     row.plan_version))

    def _all_plans(self) -> list[plans.Plan]:
        with self.cp.engine.connect() as conn:
            return plans.list_plans(conn)

    async def _ch(self, fn: Callable[..., Any], *args: Any) -> Any:
        client = await clickhouse.run_blocking(clickhouse.connect, self.cp.settings)
        return await clickhouse.run_blocking(fn, client, *args)

    async def usage(self, request: Request, ctx: TenantContext) -> Response:
        q = request.query_params
        tz = q.get("tz") or ctx.timezone
        start, end = _range(q.get("from"), q.get("to"), tz)
        window = q.get("window", "day")
        if window not in usage.WINDOWS:
            raise invalid(f"window must be one of {list(usage.WINDOWS)}", "window")
        chosen = [self._meter(m) for m in q.getlist("meter")] or list(self.meters.values())
        group_by = [g for g in q.get("group_by", "").split(",") if g]
        series = []
        for meter in chosen:
            rows = await self._ch(usage.usage, meter, ctx.tenant_id, start, end, window, tz,
                                  group_by)
            series.append({"meter": meter.name, "aggregation": meter.aggregation,
                           "rows": rows})
        return _json({"tenant_id": ctx.tenant_id, "from": start, "to": end, "window": window,
                      "tz": tz, "series": series})

    async def quota(self, request: Request, ctx: TenantContext) -> Response:
        start, end = usage.month_bounds(datetime.now(UTC), ctx.timezone)
        quota_meters = [self.meters[m] for m in ctx.plan.quotas if m in self.meters]
        used = await self._ch(usage.totals, quota_meters, ctx.tenant_id, start, end)
        lines = usage.quota_summary(used, ctx.plan.quotas, end)
        return _json({"tenant_id": ctx.tenant_id, "plan": ctx.plan.plan_id, "from": start,
                      "to": end, "quotas": lines})

    async def report(self, request: Request, ctx: TenantContext) -> Response:
        start, end = _month(request.query_params.get("period"), ctx.timezone)
        prev_start, prev_end = usage.previous_month(start, ctx.timezone)
        meters = list(self.meters.values())
        current = await self._ch(usage.totals, meters, ctx.tenant_id, start, end)
        previous = await self._ch(usage.totals, meters, ctx.tenant_id, prev_start, prev_end)
        return _json({"tenant_id": ctx.tenant_id, "from": start, "to": end,
                      "previous": {"from": prev_start, "to": prev_end},
                      "lines": usage.compare(current, previous)})

    async def export(self, request: Request, ctx: TenantContext) -> Response:
        q = request.query_params
        fmt = q.get("format", "csv")
        if fmt not in FORMATS:
            raise invalid("format must be csv or parquet", "format")
        tz = q.get("tz") or ctx.timezone
        start, end = _range(q.get("from"), q.get("to"), tz)
        body = await self._ch(export_usage, ctx.tenant_id, start, end, tz, fmt)
        name = f"usage-{ctx.tenant_id}-{start:%Y%m%d}-{end:%Y%m%d}.{fmt}"
        return Response(body, media_type=FORMATS[fmt][1],
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    async def analytics(self, request: Request, ctx: TenantContext) -> Response:
        q = request.query_params
        meter = self._meter(q.get("meter", "api_calls"))
        threshold = _number(q.get("threshold", "2"), "threshold", 0.5, 10)
        baseline = int(_number(q.get("baseline_hours", "168"), "baseline_hours", 24, 24 * 28))
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        history_start = now - timedelta(hours=baseline + 7 * 24)
        series = await self._ch(analytics.hourly_series, meter, ctx.tenant_id, history_start, now)
        found = analytics.anomalies(series, baseline, threshold, min(24, baseline))
        ahead = analytics.forecast(series[-14 * 24:], 7 * 24)
        advice = await self._plan_advice(ctx)
        return _json({"tenant_id": ctx.tenant_id, "meter": meter.name, "threshold": threshold,
                      "baseline_hours": baseline,
                      "anomalies": [a for a in found if a.at >= now - timedelta(days=7)],
                      "forecast": {"hourly": ahead,
                                   "total_7d": round(sum(p.value for p in ahead), 6)},
                      "plan_fit": advice})

    async def _plan_advice(self, ctx: TenantContext) -> Advice:
        """Fit on the larger of last month and this month projected to its end."""
        now = datetime.now(UTC)
        start, end = usage.month_bounds(now, ctx.timezone)
        prev_start, prev_end = usage.previous_month(start, ctx.timezone)
        quota_meters = [self.meters[m] for m in ctx.plan.quotas if m in self.meters]
        so_far = await self._ch(usage.totals, quota_meters, ctx.tenant_id, start, end)
        last = await self._ch(usage.totals, quota_meters, ctx.tenant_id, prev_start, prev_end)
        elapsed = Decimal(max((now - start).total_seconds(), 3600) / (end - start).total_seconds())
        used = {m: max(last.get(m, Decimal(0)), v / elapsed) for m, v in so_far.items()}
        options = [analytics.PlanOption(p.plan_id, p.name, p.price, p.quotas)
                   for p in await run_in_threadpool(self._all_plans)]
        current = analytics.PlanOption(ctx.plan.plan_id, ctx.plan.name, ctx.plan.price,
                                       ctx.plan.quotas)
        return analytics.plan_fit(current, options, used)

    def _meter(self, name: str) -> Meter:
        if name not in self.meters:
            raise invalid(f"unknown meter {name!r}; known: {sorted(self.meters)}", "meter")
        return self.meters[name]


def _principal(request: Request) -> AdminPrincipal:
    """Deny by default: mounted without the admin middleware, nothing is served."""
    try:
        return principal_of(request)
    except (KeyError, TypeError):
        raise Problem(401, "an admin token is required", kind="unauthorized") from None


def _range(start: str | None, end: str | None, tz: str) -> tuple[datetime, datetime]:
    """[from, to) from ISO timestamps or dates (dates are local midnight in `tz`)."""
    default_start, default_end = usage.month_bounds(datetime.now(UTC), tz)
    lo = _instant(start, tz, "from") if start else default_start
    hi = _instant(end, tz, "to") if end else default_end
    if not lo < hi:
        raise invalid("from must be before to", "from")
    if hi - lo > MAX_RANGE:
        raise invalid("a range covers at most 400 days", "to")
    return lo, hi


def _instant(value: str, tz: str, field: str) -> datetime:
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), usage.zone(tz))
        at = datetime.fromisoformat(value)
    except ValueError:
        raise invalid(f"{field} must be an ISO 8601 date or timestamp", field) from None
    if at.tzinfo is None:
        raise invalid(f"{field} needs a UTC offset", field)
    return at


def _month(period: str | None, tz: str) -> tuple[datetime, datetime]:
    if not period:
        return usage.month_bounds(datetime.now(UTC), tz)
    try:
        first = datetime.strptime(period, "%Y-%m").replace(tzinfo=usage.zone(tz))
    except ValueError:
        raise invalid("period must be YYYY-MM", "period") from None
    return usage.month_bounds(first, tz)


def _number(value: str, field: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise invalid(f"{field} must be a number", field) from None
    if not low <= number <= high:
        raise invalid(f"{field} must be between {low} and {high}", field)
    return number


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value.is_finite() else None
    raise TypeError


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body, default=_default), media_type="application/json")
