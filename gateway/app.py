"""The ASGI applications granian serves: the public listener and the optional admin listener.

The public app answers the probes and metrics itself, mounts the admin API unless it has its
own listener, and hands every other request to `proxy_endpoint`, the one place where the
proxied hot path is wired in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from gateway import bootstrap
from gateway.health import ReadyCheck, healthz, readyz, redis_check, store_check
from gateway.metrics_endpoint import metrics
from metering.usage_api import usage_routes
from tenancy import admin_api
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem
from tenancy.settings import Settings

PROXY_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def proxy_endpoint(request: Request) -> Response:
    """Every request that is not a probe, metrics or admin call: the proxied traffic."""
    raise Problem(501, "proxying not configured", kind="proxy-not-configured")


def _ready_checks(cp: ControlPlane) -> dict[str, ReadyCheck]:
    checks = {"store": store_check(cp.engine)}
    if cp.redis is not None:
        checks["redis"] = redis_check(cp.redis)
    return checks


def _app(
    settings: Settings, plane: ControlPlane, routes: list[BaseRoute], *, jobs: bool, owned: bool
) -> Starlette:
    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *routes,
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            async with bootstrap.background_jobs(settings, plane, enabled=jobs):
                yield
        finally:
            if owned:
                plane.close()

    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers=admin_api.EXCEPTION_HANDLERS
    )
    app.state.control_plane = plane
    app.state.ready_checks = _ready_checks(plane)
    return app


def _admin_mount(plane: ControlPlane, *, usage: bool = True) -> Mount:
    extra = usage_routes(plane) if usage else []
    return Mount(admin_api.PREFIX, app=admin_api.build(plane, extra))


def build_app(
    settings: Settings, cp: ControlPlane | None = None, *, jobs: bool = False
) -> Starlette:
    """The public listener. `jobs` runs the metering consumer and the scheduler in this
    process (embedded mode). A given `cp` stays the caller's to close; otherwise the app opens
    its own and closes it at shutdown."""
    plane = cp or ControlPlane.open(settings)
    routes: list[BaseRoute] = [] if settings.admin_separate else [_admin_mount(plane)]
    routes.append(Route("/{path:path}", proxy_endpoint, methods=PROXY_METHODS))
    return _app(settings, plane, routes, jobs=jobs, owned=cp is None)


def build_admin_app(
    settings: Settings, cp: ControlPlane | None = None, *, usage: bool = True
) -> Starlette:
    """The separate admin listener: probes, metrics and /admin/v1 only. `usage=False` leaves
    out the usage routes, for a listener process that may not open embedded chDB."""
    plane = cp or ControlPlane.open(settings)
    return _app(settings, plane, [_admin_mount(plane, usage=usage)], jobs=False,
                owned=cp is None)
