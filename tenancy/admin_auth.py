"""Who is calling the admin API, and what they may touch.

Authentication is an ASGI middleware in front of every admin route, so a route added later is
protected without remembering to protect it (deny by default). Authorisation is two checks the
handlers call: `require_platform` for operations only the platform may do (403), and
`tenant_scope` for anything addressed by tenant id, which answers 404 to a tenant admin asking
about another tenant so that ids of other tenants cannot even be confirmed to exist.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from tenancy import admin_tokens
from tenancy.admin_tokens import AdminPrincipal
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem, not_found, problem_response

PLATFORM = "platform"
TENANT = "tenant"
API_KEY_PREFIXES = ("tw_live_", "tw_test_")
PUBLIC_PATHS = frozenset({"/openapi.json"})


def _unauthorized(detail: str) -> Problem:
    challenge = {"WWW-Authenticate": 'Bearer realm="tollway-admin"'}
    return Problem(401, detail, kind="unauthorized", headers=challenge)


def bearer_secret(authorization: str | None) -> str:
    if not authorization:
        raise _unauthorized("an admin token is required: Authorization: Bearer <token>")
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise _unauthorized("the Authorization header must be 'Bearer <admin token>'")
    if secret.startswith(API_KEY_PREFIXES):
        raise _unauthorized("tenant API keys are not accepted by the admin API; use an admin token")
    return secret


def authenticate(cp: ControlPlane, authorization: str | None) -> AdminPrincipal:
    secret = bearer_secret(authorization)
    with cp.engine.connect() as conn:
        principal = admin_tokens.authenticate(conn, secret)
    if principal is None:
        raise _unauthorized("the admin token is unknown, revoked or expired")
    return principal


def require_platform(principal: AdminPrincipal) -> None:
    if principal.role != PLATFORM:
        raise Problem(403, "this operation needs a platform admin token", kind="forbidden")


def tenant_scope(principal: AdminPrincipal, tenant_id: str) -> None:
    """Let a tenant admin see only its own tenant; anything else looks like it does not exist."""
    if principal.role != PLATFORM and principal.tenant_id != tenant_id:
        raise not_found("tenant", tenant_id)


def principal_of(conn: HTTPConnection) -> AdminPrincipal:
    principal: AdminPrincipal = conn.scope["state"]["principal"]
    return principal


def actor_of(principal: AdminPrincipal) -> str:
    return f"admin:{principal.name}:{principal.token_id}"


class AdminAuthMiddleware:
    """Resolve the bearer token once per request and put the principal in the request state."""

    def __init__(self, app: ASGIApp, cp: ControlPlane) -> None:
        self.app = app
        self.cp = cp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _relative_path(scope) in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        raw = headers.get(b"authorization")
        try:
            principal = await run_in_threadpool(
                authenticate, self.cp, raw.decode("latin-1") if raw is not None else None
            )
        except Problem as problem:
            await problem_response(problem, instance=scope["path"])(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def _relative_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
