"""The ASGI applications granian serves: the public listener and the optional admin listener.

The public listener is a thin dispatcher: Tollway's own paths (probes, metrics, the admin API
unless it has its own listener, and usage ingestion) go to a Starlette app; everything else is
the proxied hot path, handed to the raw ASGI `Gateway` without Starlette's routing and
middleware in between.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.routing import BaseRoute, Mount, Route

from gateway import bootstrap
from gateway.gateway import Gateway
from gateway.health import ReadyCheck, healthz, readyz, redis_check, snapshot_check, store_check
from gateway.metrics_endpoint import metrics
from gateway.proxy import Receive, Scope, Send, send_problem
from metering.ingest_api import ingest_routes
from metering.usage_api import usage_routes
from tenancy import admin_api, hotstate
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem
from tenancy.settings import Settings

# Tollway's own paths on the public listener; these shadow upstream paths of the same name.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
INGEST_PREFIX = "/tollway"
_STARTING = Problem(503, "the gateway is starting", kind="not-ready",
                    headers={"Retry-After": "1"})


class PublicApp:
    """Dispatches by path. Tollway's own paths are matched exactly or by a fixed prefix, so a
    proxied request costs one set lookup and one `startswith` before the gateway sees it."""

    def __init__(self, control: Starlette, gateway: Gateway, ingest: Starlette,
                 admin_prefix: str | None) -> None:
        self.control = control
        self.gateway = gateway
        self.ingest = ingest
        self.state: State = control.state
        self._own = (admin_prefix + "/",) if admin_prefix else ()

    @property
    def routes(self) -> list[BaseRoute]:
        """Tollway's own routes; every other path is proxied."""
        return self.control.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.control(scope, receive, send)  # lifespan; websockets get refused there
            return
        path: str = scope["path"]
        if path in PROBES or path.startswith(self._own) or path == admin_api.PREFIX:
            await self.control(scope, receive, send)
        elif not self.gateway.started:
            await send_problem(send, _STARTING)
        elif path.startswith(INGEST_PREFIX + "/"):
            await self.gateway.authenticated(scope, receive, send, self.ingest)
        else:
            await self.gateway(scope, receive, send)


def _app(
    settings: Settings, plane: ControlPlane, routes: list[BaseRoute], *, jobs: bool, owned: bool,
    gateway: Gateway | None = None, closers: Sequence[Callable[[], Awaitable[None]]] = (),
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
                if gateway is not None:
                    await gateway.start()
                try:
                    yield
                finally:
                    if gateway is not None:
                        await gateway.close()
                    for close in closers:
                        await close()
        finally:
            if owned:
                plane.close()

    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers=admin_api.EXCEPTION_HANDLERS
    )
    app.state.control_plane = plane
    checks: dict[str, ReadyCheck] = {}
    if gateway is None or not settings.admin_separate:
        checks["store"] = store_check(plane.engine)  # the admin API is served here
    if plane.redis is not None:
        checks["redis"] = redis_check(plane.redis)
    if gateway is not None:
        checks["snapshot"] = snapshot_check(gateway.refresher)
    app.state.ready_checks = checks
    return app


def _admin_mount(plane: ControlPlane, *, usage: bool = True) -> Mount:
    extra = usage_routes(plane) if usage else []
    return Mount(admin_api.PREFIX, app=admin_api.build(plane, extra))


def build_app(
    settings: Settings, cp: ControlPlane | None = None, *, jobs: bool = False
) -> PublicApp:
    """The public listener. `jobs` runs the metering consumer and the scheduler in this
    process (embedded mode). A given `cp` stays the caller's to close; otherwise the app opens
    its own and closes it at shutdown. The gateway starts in the lifespan; until then proxied
    requests get 503."""
    plane = cp or ControlPlane.open(settings)
    gateway = Gateway.from_settings(settings, plane.engine)
    # Ingestion gets its own client: admission's has a hot-path timeout of a few ms.
    ingest_redis = aioredis.Redis.from_url(hotstate.redis_url(settings), socket_timeout=5)
    ingest = Starlette(routes=[Mount(INGEST_PREFIX, routes=ingest_routes(settings, ingest_redis))])
    routes: list[BaseRoute] = [] if settings.admin_separate else [_admin_mount(plane)]
    control = _app(settings, plane, routes, jobs=jobs, owned=cp is None, gateway=gateway,
                   closers=[ingest_redis.aclose])
    prefix = None if settings.admin_separate else admin_api.PREFIX
    return PublicApp(control, gateway, ingest, prefix)


def build_admin_app(
    settings: Settings, cp: ControlPlane | None = None, *, usage: bool = True
) -> Starlette:
    """The separate admin listener: probes, metrics and /admin/v1 only. `usage=False` leaves
    out the usage routes, for a listener process that may not open embedded chDB."""
    plane = cp or ControlPlane.open(settings)
    return _app(settings, plane, [_admin_mount(plane, usage=usage)], jobs=False,
                owned=cp is None)


__all__ = ["PublicApp", "build_admin_app", "build_app"]
