"""Proxy.forward against a real aiohttp upstream on a loopback port, driven through ASGI."""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from gateway.proxy import Proxy, ProxyResult, check_limits
from gateway.tenant_signature import HEADER, TenantSigner
from tenancy.settings import Settings, load_settings

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, not compressible into a false pass
SIGNER = TenantSigner([b"s" * 32])


class Upstream:
    """A real HTTP server whose handlers expose what the proxy sent and misbehave on cue."""

    def __init__(self) -> None:
        self.hits = 0
        self.cookies: list[str] = []
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/echo-headers", self.echo_headers)
        app.router.add_post("/echo", self.echo)
        app.router.add_get("/bytes/{n}", self.bytes_)
        app.router.add_get("/hop", self.hop)
        app.router.add_get("/sleep", self.sleep)
        app.router.add_get("/gzip", self.gzipped)
        app.router.add_get("/cookie", self.cookie)
        app.router.add_get("/stall", self.stall)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        self.url = ""

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def echo_headers(self, request: web.Request) -> web.Response:
        self.hits += 1
        body = await request.read()
        return web.json_response({
            "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            "method": request.method,
            "path": request.raw_path,
            "body_len": len(body),
            "chunked": request.headers.get("Transfer-Encoding", ""),
        })

    async def echo(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def bytes_(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse(headers={"Content-Length": str(n)})
        await resp.prepare(request)
        sent = 0
        while sent < n:
            piece = PAYLOAD[: min(len(PAYLOAD), n - sent)]
            await resp.write(piece)
            sent += len(piece)
        return resp

    async def hop(self, request: web.Request) -> web.Response:
        headers = {
            "Connection": "X-Secret, keep-alive",
            "X-Secret": "1",
            "Keep-Alive": "timeout=5",
            "X-Public": "yes",
            "Tollway-Units": "tokens=1234, images=2",
        }
        return web.Response(text="ok", headers=headers)

    async def sleep(self, request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response(text="late")

    async def stall(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(4 * len(PAYLOAD))})
        await resp.prepare(request)
        await resp.write(PAYLOAD * 2)
        await asyncio.sleep(3)
        return resp

    async def gzipped(self, request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(PAYLOAD), headers={"Content-Encoding": "gzip"})

    async def cookie(self, request: web.Request) -> web.Response:
        self.cookies.append(request.headers.get("Cookie", ""))
        return web.Response(text="c", headers={"Set-Cookie": "session=upstream-secret; Path=/"})


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.runner.cleanup()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(env={}, data_dir=tmp_path / "data", **overrides)


Harness = Callable[..., Any]


@pytest.fixture
async def harness(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Harness]:
    """Builds an ASGI app around a Proxy and an httpx client for it; collects ProxyResults."""
    proxies: list[Proxy] = []
    clients: list[httpx.AsyncClient] = []

    def build(
        target: str | None = None, client: tuple[str, int] = ("192.0.2.7", 5000), **overrides: Any
    ) -> tuple[httpx.AsyncClient, list[ProxyResult]]:
        proxy = Proxy(make_settings(tmp_path, **overrides))
        proxies.append(proxy)
        results: list[ProxyResult] = []

        async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
            result = await proxy.forward(
                scope, receive, send,
                upstream=target or upstream.url,
                path=scope["raw_path"],
                query=scope["query_string"],
                headers=scope["headers"],
                upstream_headers=[(HEADER, SIGNER.sign("ten_1", "key_1", time.time()))],
                extra_response_headers=[(b"ratelimit", b"limit=10")],
            )
            results.append(result)

        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=client),
            base_url="http://tenant.example.com",
            timeout=10,
        )
        clients.append(http)
        return http, results

    yield build
    for http in clients:
        await http.aclose()
    for proxy in proxies:
        await proxy.close()


def sent_headers(response: httpx.Response) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


async def test_get_passes_path_query_and_status(harness: Harness) -> None:
    http, results = harness()
    r = await http.get("/echo-headers?a=1&b=%2F", headers={"X-Custom": "v"})
    assert r.status_code == 200
    body = r.json()
    assert body["path"] == "/echo-headers?a=1&b=%2F"
    assert body["method"] == "GET"
    sent = sent_headers(r)
    assert sent["x-custom"] == ["v"]
    [signed] = sent["x-tollway-tenant"]
    claims = SIGNER.verify(signed, max_age_s=5, now=time.time())
    assert claims is not None and (claims.tenant_id, claims.key_id) == ("ten_1", "key_1")
    assert "user-agent" in sent  # the client's own, not one invented by aiohttp
    assert sent["user-agent"][0].startswith("python-httpx")
    assert r.headers["ratelimit"] == "limit=10"
    assert results[0].status == 200 and results[0].bytes_out == len(r.content)
    assert results[0].upstream_ms > 0


async def test_large_bodies_stream_both_ways(harness: Harness) -> None:
    http, results = harness(max_body_bytes=64 * 1024 * 1024)
    body = PAYLOAD * 8

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 100_000):
            yield body[i : i + 100_000]

    r = await http.post("/echo", content=chunks())
    assert r.status_code == 200
    assert r.content == body
    assert results[0].bytes_in == len(body) and results[0].bytes_out == len(body)

    r = await http.post("/echo", content=body)  # with Content-Length
    assert r.content == body

    r = await http.get(f"/bytes/{len(body) * 2}")
    assert len(r.content) == len(body) * 2 and r.content[:len(PAYLOAD)] == PAYLOAD
    assert results[-1].bytes_out == len(body) * 2


async def test_chunked_request_is_forwarded_chunked(harness: Harness) -> None:
    http, _ = harness()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"a" * 10
        yield b"b" * 10

    r = await http.post("/echo-headers", content=chunks())
    assert r.json()["body_len"] == 20
    assert r.json()["chunked"] == "chunked"
    r = await http.post("/echo-headers", content=b"x" * 20)
    assert r.json()["chunked"] == ""
    assert sent_headers(r)["content-length"] == ["20"]


async def test_hop_by_hop_and_units_in_response(harness: Harness) -> None:
    http, results = harness()
    r = await http.get("/hop")
    assert r.text == "ok"
    assert r.headers["x-public"] == "yes"
    for name in ("x-secret", "keep-alive", "tollway-units", "connection"):
        assert name not in r.headers
    assert results[0].units == {"tokens": Decimal(1234), "images": Decimal(2)}


async def test_request_header_rules_end_to_end(harness: Harness) -> None:
    http, _ = harness()
    r = await http.get(
        "/echo-headers",
        headers={
            "Connection": "X-Drop-Me",
            "X-Drop-Me": "1",
            "Keep-Alive": "timeout=1",
            "X-Tenant-ID": "other-tenant",
            "X-Tollway-Tenant": "forged",
            "X-API-Key": "tw_live_secret",
            "X-Forwarded-For": "6.6.6.6",
            "Forwarded": "for=6.6.6.6",
        },
    )
    sent = sent_headers(r)
    for name in ("x-drop-me", "keep-alive", "x-tenant-id", "x-api-key"):
        assert name not in sent
    [signed] = sent["x-tollway-tenant"]
    assert SIGNER.verify(signed, max_age_s=5, now=time.time()) is not None
    assert sent["x-forwarded-for"] == ["192.0.2.7"]
    assert sent["forwarded"] == ["for=192.0.2.7;proto=http;host=tenant.example.com"]
    assert sent["x-forwarded-host"] == ["tenant.example.com"]
    assert sent["x-forwarded-proto"] == ["http"]
    assert sent["host"] != ["tenant.example.com"]

    r = await http.get("/echo-headers", headers={"Authorization": "Bearer tw_live_abc"})
    assert "authorization" not in sent_headers(r)
    r = await http.get("/echo-headers", headers={"Authorization": "Bearer eyJhbGciOi.x.y"})
    assert sent_headers(r)["authorization"] == ["Bearer eyJhbGciOi.x.y"]


async def test_forwarded_for_trusted_proxy_appends(harness: Harness) -> None:
    http, _ = harness(client=("10.1.2.3", 4000), trusted_proxies=("10.0.0.0/8",))
    r = await http.get(
        "/echo-headers",
        headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https",
                 "Forwarded": "for=203.0.113.9;proto=https"},
    )
    sent = sent_headers(r)
    assert sent["x-forwarded-for"] == ["203.0.113.9, 10.1.2.3"]
    assert sent["x-forwarded-proto"] == ["https"]
    assert sent["forwarded"] == [
        "for=203.0.113.9;proto=https, for=10.1.2.3;proto=http;host=tenant.example.com"
    ]


async def test_forwarded_quotes_ipv6_peer(harness: Harness) -> None:
    http, _ = harness(client=("2001:db8::1", 4000))
    r = await http.get("/echo-headers")
    assert sent_headers(r)["forwarded"][0].startswith('for="[2001:db8::1]";proto=http')


async def test_header_block_too_large_is_431(harness: Harness, upstream: Upstream) -> None:
    http, results = harness(max_header_bytes=4096)
    r = await http.get("/echo-headers", headers={"X-Big": "v" * 5000})
    assert r.status_code == 431
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == 431
    assert upstream.hits == 0 and results[0].status == 431


async def test_declared_body_too_large_is_413_without_upstream(
    harness: Harness, upstream: Upstream
) -> None:
    http, _ = harness(max_body_bytes=1000)
    r = await http.post("/echo-headers", content=b"x" * 1001)
    assert r.status_code == 413
    assert r.json()["type"].endswith("content-too-large")
    assert upstream.hits == 0
    r = await http.post("/echo-headers", content=b"x" * 1000)
    assert r.status_code == 200


async def test_chunked_body_over_limit_is_413(harness: Harness) -> None:
    http, results = harness(max_body_bytes=1000)

    async def single() -> AsyncIterator[bytes]:
        yield b"x" * 1500

    async def many() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 300

    for body in (single(), many()):
        r = await http.post("/echo", content=body)
        assert r.status_code == 413
        assert r.headers["content-type"] == "application/problem+json"
    assert [res.status for res in results] == [413, 413]


async def test_connect_failure_is_502(harness: Harness) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    http, results = harness(target=f"http://127.0.0.1:{port}")
    r = await http.get("/anything")
    assert r.status_code == 502
    problem = r.json()
    assert problem["detail"] == "the upstream service could not be reached"
    assert str(port) not in r.text and "Errno" not in r.text
    assert results[0].status == 502


async def test_read_timeout_is_504(harness: Harness) -> None:
    http, results = harness(upstream_read_timeout_s=0.3)
    r = await http.get("/sleep")
    assert r.status_code == 504
    assert r.json()["title"] == "Gateway Timeout"
    assert results[0].status == 504


async def test_upstream_silent_mid_body_is_cut_not_completed(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Driven with plain ASGI callables so the unfinished response itself can be inspected."""
    proxy = Proxy(make_settings(tmp_path, upstream_read_timeout_s=0.3))
    sent: list[MutableMapping[str, Any]] = []

    received = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if received.is_set():  # as a server does: nothing more until the client leaves
            await asyncio.Event().wait()
        received.set()
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    headers = [(b"host", b"x")]
    scope = {"type": "http", "method": "GET", "scheme": "http", "client": ("192.0.2.7", 1),
             "headers": headers}
    try:
        result = await proxy.forward(scope, receive, send, upstream=upstream.url, path=b"/stall",
                                     query=b"", headers=headers)
    finally:
        await proxy.close()
    assert (result.status, result.aborted) == (504, True)
    assert result.bytes_out == 2 * len(PAYLOAD)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert all(m["more_body"] for m in sent[1:])  # never marked complete


async def test_encoded_body_passes_untouched(harness: Harness) -> None:
    http, results = harness()
    r = await http.get("/gzip", headers={"Accept-Encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip"
    assert r.content == PAYLOAD  # httpx decodes; aiohttp must not have
    assert results[0].bytes_out == len(gzip.compress(PAYLOAD))


async def test_upstream_cookies_do_not_leak_between_requests(
    harness: Harness, upstream: Upstream
) -> None:
    http, _ = harness()
    r = await http.get("/cookie")
    assert "session=upstream-secret" in r.headers["set-cookie"]
    http.cookies.clear()
    await http.get("/cookie")
    assert upstream.cookies == ["", ""]


async def test_problem_bodies_are_json(harness: Harness) -> None:
    http, _ = harness(max_header_bytes=100)
    r = await http.get("/x", headers={"X-Pad": "p" * 200})
    assert orjson.loads(r.content)["detail"] == "request headers exceed 100 bytes"


# --- through a real granian server: what a client on a socket observes ---


def served_app() -> Any:
    """granian --factory entry point: the bare proxy in front of $TOLLWAY_UPSTREAM."""
    settings = load_settings()
    proxy = Proxy(settings)
    upstream = settings.upstream or ""

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await proxy.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        await proxy.forward(scope, receive, send, upstream=upstream,
                            path=scope["raw_path"],
                            query=scope["query_string"], headers=scope["headers"])

    return app


class StreamingUpstream:
    """Serves an endless body, or a body cut short, and records how the streams ended."""

    def __init__(self) -> None:
        self.ended: list[str] = []
        app = web.Application()
        app.router.add_get("/endless", self.endless)
        app.router.add_get("/cut", self.cut)
        app.router.add_route("HEAD", "/head", self.head)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)

    async def endless(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(1 << 40)})
        await resp.prepare(request)
        try:
            for _ in range((1 << 40) // len(PAYLOAD)):
                await resp.write(PAYLOAD)
        except (ConnectionError, asyncio.CancelledError):
            self.ended.append("client went away")
            raise
        return resp

    async def cut(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(10 * len(PAYLOAD))})
        await resp.prepare(request)
        await resp.write(PAYLOAD * 2)
        assert request.transport is not None
        request.transport.close()
        return resp

    async def head(self, request: web.Request) -> web.Response:
        return web.Response(headers={"Content-Length": str(5 << 20), "X-Head": "1"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_through_granian_truncation_disconnect_and_head(tmp_path: Path) -> None:
    origin = StreamingUpstream()
    await origin.runner.setup()
    site = web.TCPSite(origin.runner, "127.0.0.1", 0)
    await site.start()
    origin_port = origin.runner.addresses[0][1]
    port = free_port()
    granian = Path(sys.executable).parent / "granian"
    proc = subprocess.Popen(
        [str(granian), "--interface", "asgi", "--factory", "--no-ws", "--workers", "1",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
         "tests.test_proxy:served_app"],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "TOLLWAY_UPSTREAM": f"http://127.0.0.1:{origin_port}",
             "TOLLWAY_DATA_DIR": str(tmp_path)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for _ in range(100):
                try:
                    await http.head("/head")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)

            r = await http.head("/head")
            assert r.status_code == 200 and r.headers["x-head"] == "1" and r.content == b""

            # An upstream dying mid-body must not look like a complete response.
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get("/cut")

            # A client leaving a huge download stops the upstream transfer too.
            async with http.stream("GET", "/endless") as resp:
                got = 0
                async for chunk in resp.aiter_raw():
                    got += len(chunk)
                    if got > 4 * len(PAYLOAD):
                        break
            for _ in range(100):
                if origin.ended:
                    break
                await asyncio.sleep(0.05)
            assert origin.ended == ["client went away"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        await origin.runner.cleanup()


def test_check_limits(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_header_bytes=64, max_body_bytes=10)
    assert check_limits([(b"content-length", b"10")], settings) is None
    too_big = check_limits([(b"Content-Length", b"11")], settings)
    assert too_big is not None and too_big.status == 413
    bad = check_limits([(b"content-length", b"-1")], settings)
    assert bad is not None and bad.status == 400
    # 30 + 30 + 4 = 64 bytes on the wire is allowed, one more is not
    assert check_limits([(b"x" * 30, b"y" * 30)], settings) is None
    wide = check_limits([(b"x" * 30, b"y" * 31)], settings)
    assert wide is not None and wide.status == 431
