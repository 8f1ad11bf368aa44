"""Reference proxies for bench_proxy.py, run side by side with Tollway's in the same run.

- `naive_app`: the issue's yardstick, "a naive Starlette proxy with one Lua call per request"
  (0.16 of nginx where it was first measured): Starlette routing and Request, one redis-py
  script call per request (naive_limiter.lua), aiohttp to the upstream, the body read whole.
  No tenant resolution, no leases or quotas, no usage events. Tollway's full path has to beat
  it by the ratio of the targets (0.25 / 0.16) to meet the issue's target wherever nginx runs.
- `aiohttp_app`: the same forwarding rules as Tollway's proxy (gateway.forwarding) on an aiohttp
  ClientSession, the client the proxy used before gateway/upstream.py; for the client choice.

Served by granian with `--factory`; configured by TOLLWAY_UPSTREAM and TOLLWAY_REDIS_URL.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.forwarding import TrustedProxies, request_headers, response_headers
from tenancy.settings import load_settings

LIMIT_PER_S = 10**9  # far above what the box can do: the limiter is measured, not exercised
_SCRIPT = Path(__file__).with_name("naive_limiter.lua").read_text()

Message = MutableMapping[str, Any]


def _session(pool: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=pool, limit_per_host=0),
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
    )


def naive_app() -> Starlette:
    settings = load_settings()
    upstream = settings.upstream or ""
    redis = Redis.from_url(settings.redis_url or "redis://127.0.0.1:6379/0")
    limiter = redis.register_script(_SCRIPT)
    state: dict[str, aiohttp.ClientSession] = {}

    async def proxy(request: Request) -> Response:
        key = request.headers.get("x-api-key", "anonymous")
        if await limiter(keys=[f"naive:{key}"], args=[LIMIT_PER_S]) == -1:
            return Response(status_code=429)
        if "session" not in state:
            state["session"] = _session(settings.upstream_pool_size)
        headers = {k: v for k, v in request.headers.items() if k not in ("host", "x-api-key")}
        async with state["session"].request(
            request.method, upstream + request.url.path, params=request.query_params,
            headers=headers, data=await request.body(),
        ) as resp:
            body = await resp.read()
            out = {k: v for k, v in resp.headers.items()
                   if k.lower() not in ("transfer-encoding", "connection", "content-length")}
            return Response(body, resp.status, out)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if "session" in state:
            await state["session"].close()
        await redis.aclose()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    return Starlette(routes=[Route("/{path:path}", proxy, methods=methods)], lifespan=lifespan)


def aiohttp_app() -> Callable[..., Any]:
    settings = load_settings()
    upstream = settings.upstream or ""
    trusted = TrustedProxies(settings.trusted_proxies)
    state: dict[str, aiohttp.ClientSession] = {}

    async def app(scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            if "session" in state:
                await state["session"].close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if "session" not in state:
            state["session"] = _session(settings.upstream_pool_size)
        peer = scope.get("client")
        headers = request_headers(scope["headers"], client=peer[0] if peer else None,
                                  scheme=scope["scheme"], trusted=trusted)
        body = (await receive()).get("body") or None
        url = upstream + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        async with state["session"].request(
            scope["method"], url, headers=[(k.decode(), v.decode("latin-1")) for k, v in headers],
            data=body, allow_redirects=False,
        ) as resp:
            out, _ = response_headers(resp.raw_headers)
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app
