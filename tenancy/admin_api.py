"""The admin HTTP API (mounted at /admin/v1): thin handlers over the tenancy services.

Handlers only translate HTTP to service calls: they validate the body against the published
schema (tenancy.openapi), check the principal's reach (tenancy.admin_auth), run the blocking
store work in the thread pool and render the result with orjson. Every failure leaves as
problem+json; an unexpected exception is answered with a bare 500 and then re-raised by
Starlette so that the server logs the traceback (never the client).
"""

from __future__ import annotations

import tomllib
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import yaml
from sqlalchemy import and_, select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tenancy import admin_tokens, keys, plans, tenants
from tenancy.admin_auth import (
    AdminAuthMiddleware,
    actor_of,
    principal_of,
    require_platform,
    tenant_scope,
)
from tenancy.controlplane import ControlPlane
from tenancy.openapi import LIFECYCLE_ACTIONS, check_body, document
from tenancy.problems import Problem, invalid, problem_response
from tenancy.tables import audit_events

PREFIX = "/admin/v1"
MAX_PAGE = 500
MAX_BODY = 1 << 20
TENANT_ADMIN_FIELDS = frozenset({"settings", "metadata", "locale", "timezone"})
PLATFORM_SETTINGS = frozenset({"dunning_days", "features"})
PLAN_MEDIA = {
    "application/json": "json",
    "application/toml": "toml",
    "application/yaml": "yaml",
    "application/x-yaml": "yaml",
    "text/yaml": "yaml",
}

Handler = Callable[[Request], Awaitable[Response]]


def _default(value: Any) -> Any:
    """What orjson leaves to us: Decimal (money, as an exact string) and sets."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_response(doc: Any, status: int = 200) -> Response:
    # NON_STR_KEYS: SQLAlchemy row keys are `quoted_name`, a str subclass orjson rejects.
    body = orjson.dumps(doc, default=_default, option=orjson.OPT_NON_STR_KEYS)
    return Response(body, status_code=status, media_type="application/json")


def _cp(request: Request) -> ControlPlane:
    cp: ControlPlane = request.app.state.control_plane
    return cp


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _body(request: Request) -> bytes:
    """The request body, refused with 413 past MAX_BODY instead of buffered without bound."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise _too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> Problem:
    return Problem(413, f"admin request bodies are limited to {MAX_BODY} bytes",
                   kind="content-too-large")


async def _json_body(request: Request, schema: str, *, optional: bool = False) -> dict[str, Any]:
    raw = await _body(request)
    if not raw.strip() and optional:
        return {}
    media = _media_type(request)
    if media != "application/json" and not media.endswith("+json"):
        raise Problem(415, "send the body as application/json", kind="unsupported-media-type")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, f"the body is not valid JSON: {exc}", kind="malformed-json") from None
    return check_body(schema, doc)


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", "50")
    try:
        limit = int(raw)
    except ValueError:
        raise invalid("limit must be an integer", field="limit") from None
    if not 1 <= limit <= MAX_PAGE:
        raise invalid(f"limit must be between 1 and {MAX_PAGE}", field="limit")
    return limit


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


# tenants


def _get_tenant(cp: ControlPlane, tenant_id: str) -> dict[str, Any]:
    with cp.engine.connect() as conn:
        return tenants.get(conn, tenant_id)


async def create_tenant(request: Request) -> Response:
    principal = principal_of(request)
    require_platform(principal)
    body = await _json_body(request, "TenantCreate")
    tenant = await run_in_threadpool(
        lambda: tenants.create(_cp(request), actor=actor_of(principal), **body)
    )
    return json_response(tenant, 201)


async def list_tenants(request: Request) -> Response:
    require_platform(principal_of(request))
    params = request.query_params
    limit = _limit(request)

    def run() -> tuple[list[dict[str, Any]], str | None]:
        with _cp(request).engine.connect() as conn:
            return tenants.list_tenants(
                conn, q=params.get("q"), status=params.get("status"), plan=params.get("plan"),
                limit=limit, cursor=params.get("cursor"),
            )

    items, next_cursor = await run_in_threadpool(run)
    return json_response({"items": items, "next_cursor": next_cursor})


async def get_tenant(request: Request) -> Response:
    tenant_id = request.path_params["tenant_id"]
    tenant_scope(principal_of(request), tenant_id)
    return json_response(await run_in_threadpool(_get_tenant, _cp(request), tenant_id))


async def patch_tenant(request: Request) -> Response:
    principal = principal_of(request)
    tenant_id = request.path_params["tenant_id"]
    tenant_scope(principal, tenant_id)
    body = await _json_body(request, "TenantPatch")
    if principal.role != "platform":
        reserved = sorted(set(body) - TENANT_ADMIN_FIELDS)
        if reserved:
            raise _reserved(reserved[0])
        if "settings" in body:
            current = await run_in_threadpool(_get_tenant, _cp(request), tenant_id)
            body["settings"] = _keep_platform_settings(current["settings"], body["settings"])
    tenant = await run_in_threadpool(
        lambda: tenants.update(_cp(request), tenant_id, actor=actor_of(principal), **body)
    )
    return json_response(tenant)


def _reserved(field: str) -> Problem:
    return Problem(403, f"only a platform admin may change {field!r}", kind="forbidden",
                   errors=[{"field": field, "message": "reserved to platform admins"}])


def _keep_platform_settings(current: dict[str, Any], proposed: dict[str, Any]) -> dict[str, Any]:
    """A tenant admin replaces its settings but not the commercial ones (grace before
    suspension, feature flags): changing them is refused, omitting them keeps them."""
    for key in PLATFORM_SETTINGS:
        if key in proposed and proposed[key] != current.get(key):
            raise _reserved(f"settings.{key}")
    return {**proposed, **{k: current[k] for k in PLATFORM_SETTINGS if k in current}}


def _lifecycle(action: str) -> Handler:
    async def handler(request: Request) -> Response:
        principal = principal_of(request)
        tenant_id = request.path_params["tenant_id"]
        tenant_scope(principal, tenant_id)
        require_platform(principal)
        body = await _json_body(request, "LifecycleAction", optional=True)
        tenant = await run_in_threadpool(
            lambda: tenants.transition(
                _cp(request), tenant_id, action, actor=actor_of(principal),
                reason=body.get("reason"),
            )
        )
        return json_response(tenant)

    handler.__name__ = f"tenant_{action}"
    return handler


async def set_plan(request: Request) -> Response:
    principal = principal_of(request)
    tenant_id = request.path_params["tenant_id"]
    tenant_scope(principal, tenant_id)
    require_platform(principal)
    body = await _json_body(request, "PlanChange")
    tenant = await run_in_threadpool(
        lambda: tenants.change_plan(
            _cp(request), tenant_id, body["plan"], actor=actor_of(principal),
            version=body.get("version"),
        )
    )
    return json_response(tenant)


# plans


async def list_plans(request: Request) -> Response:
    def run() -> list[plans.Plan]:
        with _cp(request).engine.connect() as conn:
            return plans.list_plans(conn)

    return json_response({"items": await run_in_threadpool(run)})


async def get_plan(request: Request) -> Response:
    plan_id = request.path_params["plan_id"]

    def run() -> plans.Plan:
        with _cp(request).engine.connect() as conn:
            return plans.load(conn, plan_id)

    return json_response(await run_in_threadpool(run))


def parse_plans_document(raw: bytes, media: str) -> Any:
    """Decode a plans document in the format its Content-Type names (400 when it does not parse)."""
    fmt = PLAN_MEDIA.get(media)
    if fmt is None:
        raise Problem(415, "send plans as application/json, application/toml or application/yaml",
                      kind="unsupported-media-type")
    try:
        if fmt == "json":
            return orjson.loads(raw)
        if fmt == "toml":
            return tomllib.loads(raw.decode())
        return yaml.safe_load(raw)
    except (orjson.JSONDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError,
            UnicodeDecodeError) as exc:
        raise Problem(400, f"the plans document is not valid {fmt}: {exc}",
                      kind="malformed-document") from None


async def apply_plans(request: Request) -> Response:
    principal = principal_of(request)
    require_platform(principal)
    doc = parse_plans_document(await _body(request), _media_type(request))
    if not isinstance(doc, dict):
        raise invalid("a plans document must be a mapping: {plans: {<plan id>: {...}}}")
    result = await run_in_threadpool(
        lambda: plans.apply(_cp(request), doc, actor=actor_of(principal))
    )
    return json_response({"plans": result})


# keys


async def create_key(request: Request) -> Response:
    principal = principal_of(request)
    tenant_id = request.path_params["tenant_id"]
    tenant_scope(principal, tenant_id)
    body = await _json_body(request, "KeyCreate", optional=True)
    if "expires_at" in body:
        body["expires_at"] = _when(body["expires_at"])
    record, secret = await run_in_threadpool(
        lambda: keys.create(_cp(request), tenant_id, actor=actor_of(principal), **body)
    )
    return json_response({**record, "secret": secret}, 201)


async def list_keys(request: Request) -> Response:
    tenant_id = request.path_params["tenant_id"]
    tenant_scope(principal_of(request), tenant_id)

    def run() -> list[dict[str, Any]]:
        with _cp(request).engine.connect() as conn:
            return keys.list_keys(conn, tenant_id)

    return json_response({"items": await run_in_threadpool(run)})


async def revoke_key(request: Request) -> Response:
    principal = principal_of(request)
    tenant_id, key_id = request.path_params["tenant_id"], request.path_params["key_id"]
    tenant_scope(principal, tenant_id)
    record = await run_in_threadpool(
        lambda: keys.revoke(_cp(request), key_id, actor=actor_of(principal), tenant_id=tenant_id)
    )
    return json_response(record)


async def rotate_key(request: Request) -> Response:
    principal = principal_of(request)
    tenant_id, key_id = request.path_params["tenant_id"], request.path_params["key_id"]
    tenant_scope(principal, tenant_id)
    body = await _json_body(request, "KeyRotate", optional=True)
    overlap = timedelta(seconds=body.get("overlap_seconds", 86400))
    record, secret = await run_in_threadpool(
        lambda: keys.rotate(_cp(request), key_id, actor=actor_of(principal), overlap=overlap,
                            tenant_id=tenant_id)
    )
    return json_response({**record, "secret": secret}, 201)


# admin tokens


async def create_admin_token(request: Request) -> Response:
    principal = principal_of(request)
    require_platform(principal)
    body = await _json_body(request, "AdminTokenCreate")
    if body["role"] == "tenant" and not body.get("tenant_id"):
        raise invalid("a tenant admin token needs tenant_id", field="tenant_id")
    if body["role"] == "platform" and body.get("tenant_id"):
        raise invalid("a platform admin token has no tenant_id", field="tenant_id")
    record, secret = await run_in_threadpool(
        lambda: admin_tokens.create(
            _cp(request), actor=actor_of(principal), name=body["name"], role=body["role"],
            tenant_id=body.get("tenant_id"), expires_at=_when(body.get("expires_at")),
        )
    )
    return json_response({**record, "secret": secret}, 201)


async def list_admin_tokens(request: Request) -> Response:
    require_platform(principal_of(request))

    def run() -> list[dict[str, Any]]:
        with _cp(request).engine.connect() as conn:
            return admin_tokens.list_tokens(conn)

    return json_response({"items": await run_in_threadpool(run)})


async def revoke_admin_token(request: Request) -> Response:
    principal = principal_of(request)
    require_platform(principal)
    token_id = request.path_params["token_id"]
    record = await run_in_threadpool(
        lambda: admin_tokens.revoke(_cp(request), token_id, actor=actor_of(principal))
    )
    return json_response(record)


# audit


def _cursor(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit():
        raise invalid("cursor is not one this API issued", field="cursor")
    return int(raw)


async def list_audit(request: Request) -> Response:
    principal = principal_of(request)
    params = request.query_params
    tenant_id = params.get("tenant_id")
    if tenant_id is not None:
        tenant_scope(principal, tenant_id)
    elif principal.role != "platform":
        tenant_id = principal.tenant_id
    limit, before = _limit(request), _cursor(params.get("cursor"))
    clauses = []
    if tenant_id is not None:
        clauses.append(audit_events.c.tenant_id == tenant_id)
    if params.get("type"):
        clauses.append(audit_events.c.type == params["type"])
    if before is not None:
        clauses.append(audit_events.c.seq < before)
    query = select(audit_events).where(and_(True, *clauses))
    query = query.order_by(audit_events.c.seq.desc()).limit(limit + 1)

    def run() -> list[dict[str, Any]]:
        with _cp(request).engine.connect() as conn:
            rows = [dict(row) for row in conn.execute(query).mappings()]
        for row in rows:  # SQLite hands back naive datetimes; they are UTC
            if row["at"].tzinfo is None:
                row["at"] = row["at"].replace(tzinfo=UTC)
        return rows

    rows = await run_in_threadpool(run)
    next_cursor = str(rows[limit - 1]["seq"]) if len(rows) > limit else None
    return json_response({"items": rows[:limit], "next_cursor": next_cursor})


async def openapi_json(request: Request) -> Response:
    return json_response(request.app.state.openapi)


ROUTES: list[BaseRoute] = [
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/tenants", create_tenant, methods=["POST"]),
    Route("/tenants", list_tenants, methods=["GET"]),
    Route("/tenants/{tenant_id}", get_tenant, methods=["GET"]),
    Route("/tenants/{tenant_id}", patch_tenant, methods=["PATCH"]),
    Route("/tenants/{tenant_id}/plan", set_plan, methods=["PUT"]),
    *[Route(f"/tenants/{{tenant_id}}/{a}", _lifecycle(a), methods=["POST"])
      for a in LIFECYCLE_ACTIONS],
    Route("/tenants/{tenant_id}/keys", create_key, methods=["POST"]),
    Route("/tenants/{tenant_id}/keys", list_keys, methods=["GET"]),
    Route("/tenants/{tenant_id}/keys/{key_id}", revoke_key, methods=["DELETE"]),
    Route("/tenants/{tenant_id}/keys/{key_id}/rotate", rotate_key, methods=["POST"]),
    Route("/plans", list_plans, methods=["GET"]),
    Route("/plans", apply_plans, methods=["POST"]),
    Route("/plans/{plan_id}", get_plan, methods=["GET"]),
    Route("/admin-tokens", create_admin_token, methods=["POST"]),
    Route("/admin-tokens", list_admin_tokens, methods=["GET"]),
    Route("/admin-tokens/{token_id}", revoke_admin_token, methods=["DELETE"]),
    Route("/audit", list_audit, methods=["GET"]),
]


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(exc, instance=request.url.path)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    problem = Problem(exc.status_code, str(exc.detail), headers=headers)
    return problem_response(problem, instance=request.url.path)


async def _on_crash(request: Request, exc: Exception) -> Response:
    problem = Problem(500, "the request failed unexpectedly; the error was logged",
                      kind="internal-error")
    return problem_response(problem, instance=request.url.path)


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    Problem: _on_problem,
    HTTPException: _on_http_error,
    Exception: _on_crash,
}


def build(cp: ControlPlane, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """The admin API as an ASGI app, to be mounted at PREFIX. `extra_routes` are other
    packages' admin routes (usage), composed by the gateway; they sit behind the same auth."""
    app = Starlette(
        routes=[*ROUTES, *extra_routes],
        middleware=[Middleware(AdminAuthMiddleware, cp=cp)],
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.control_plane = cp
    app.state.openapi = document()
    return app
