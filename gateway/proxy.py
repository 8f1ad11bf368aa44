"""Forwarding one request to an upstream and streaming the answer back, over raw ASGI.

The upstream client is gateway.upstream's lean HTTP/1.1 pool: aiohttp was measured at about
ten times httpx's throughput here, and this client at a fraction of aiohttp's CPU per request
(benchmarks/RESULTS.md, "Proxy" and "Hot path CPU"). Bodies move chunk by chunk in both
directions; nothing is buffered whole, so memory stays flat whatever the size.

Failures the client can see are problem+json: 431/413 for oversized requests before any
upstream I/O, 502 when the upstream cannot be reached or answers garbage, 504 when it does
not answer in time. The upstream's exception text stays in the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from gateway.forwarding import (
    Header,
    TrustedProxies,
    header_bytes,
    request_headers,
    response_headers,
)
from gateway.units import parse_units
from gateway.upstream import Response, UpstreamClient, UpstreamError, origin
from tenancy.problems import PROBLEM_JSON, Problem
from tenancy.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("tollway.proxy")

CLIENT_CLOSED = 499  # nginx's convention: the client went away before the response was done
_PROBLEM_TYPE = PROBLEM_JSON.encode()
_WATCH_AFTER_BYTES = 1 << 20
_SMALL_BODY_BYTES = 64 * 1024
_BODY_HEADERS = frozenset({b"content-length", b"transfer-encoding"})  # ASGI names are lowercase


@dataclass(slots=True)
class ProxyResult:
    """Response facts for the usage event. `upstream_ms` is the time to the upstream's
    response headers; `aborted` means the response was cut off mid-body."""

    status: int
    bytes_in: int
    bytes_out: int
    units: dict[str, Decimal] = field(default_factory=dict)
    upstream_ms: float = 0.0
    aborted: bool = False


class _ClientGone(Exception):
    pass


class _TooLarge(Exception):
    pass


class _Upload:
    """One exchange's progress: the client's body as an async iterator for the upstream
    client, counted and capped as it flows, and the bytes sent back. Errors raised in the
    body iterator surface as the upstream exchange failing, so outcomes are kept in flags
    rather than read off the exception."""

    __slots__ = ("finished", "gone", "limit", "receive", "received", "responding", "sent",
                 "too_large")

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.received = 0
        self.sent = 0
        self.finished = False
        self.too_large = False
        self.gone = False
        self.responding = False

    async def first(self) -> tuple[bytes, bool]:
        """The first body chunk and whether more follows; a small body is then sent with a
        Content-Length instead of chunked."""
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.gone = True
            raise _ClientGone
        body: bytes = message.get("body", b"")
        self._count(body)
        more = bool(message.get("more_body", False))
        self.finished = not more
        return body, more

    async def rest(self, first: bytes) -> AsyncIterator[bytes]:
        if first:
            yield first
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                raise _ClientGone
            body: bytes = message.get("body", b"")
            self._count(body)
            if body:
                yield body
            if not message.get("more_body", False):
                self.finished = True
                return

    def _count(self, body: bytes) -> None:
        self.received += len(body)
        if self.received > self.limit:
            self.too_large = True
            raise _TooLarge


async def send_problem(send: Send, problem: Problem, extra_headers: Sequence[Header] = ()) -> int:
    """Render a Problem on a raw ASGI `send`; returns the body size for byte accounting."""
    body = orjson.dumps(problem.body())
    headers = [(b"content-type", _PROBLEM_TYPE), (b"content-length", str(len(body)).encode())]
    headers.extend((k.lower().encode(), v.encode()) for k, v in problem.headers.items())
    headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return len(body)


def check_limits(headers: Sequence[Header], settings: Settings) -> Problem | None:
    """Header-size and declared-body-size limits, cheap enough to run before admission so an
    oversized request costs the tenant no quota."""
    if header_bytes(headers) > settings.max_header_bytes:
        return Problem(431, f"request headers exceed {settings.max_header_bytes} bytes")
    for name, value in headers:
        if name.lower() == b"content-length":
            if not value.isdigit():
                return Problem(400, "invalid Content-Length")
            if int(value) > settings.max_body_bytes:
                return _too_large(settings)
    return None


def _bodyless(scope: Scope, headers: Sequence[Header]) -> bool:
    """An HTTP/1.x request with neither Content-Length nor Transfer-Encoding has no body
    (RFC 9112 §6.3), so there is no need to wait on `receive` for it; HTTP/2 can send a body
    without declaring either."""
    if scope.get("http_version", "1.1") not in ("1.1", "1.0"):
        return False
    return all(name not in _BODY_HEADERS for name, _ in headers)


def _too_large(settings: Settings) -> Problem:
    return Problem(413, f"request body exceeds {settings.max_body_bytes} bytes")


class Proxy:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.trusted = TrustedProxies(settings.trusted_proxies)
        self.client = UpstreamClient(
            pool_size=settings.upstream_pool_size,
            connect_timeout_s=settings.upstream_connect_timeout_s,
            read_timeout_s=settings.upstream_read_timeout_s,
            ca_file=str(settings.upstream_ca_file) if settings.upstream_ca_file else None,
        )

    async def close(self) -> None:
        await self.client.close()

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        upstream: str,
        path: bytes,
        query: bytes,
        headers: Sequence[Header],
        upstream_headers: Sequence[Header] = (),
        extra_response_headers: Sequence[Header] = (),
        limits_checked: bool = False,
    ) -> ProxyResult:
        """Send the request to `upstream` (scheme://host[:port][/base]) + `path` (already
        percent-encoded, e.g. the ASGI raw_path) + `query`, and stream the response to `send`.

        `headers` are the client's request headers, filtered here (gateway.forwarding);
        `upstream_headers` are trusted additions such as the signed tenant header, and
        `extra_response_headers` (RateLimit...) are added to whatever the client receives.
        `limits_checked` says the caller already ran `check_limits` (the gateway does, before
        admission, so an oversized request costs no quota).
        """
        settings = self.settings
        if not limits_checked:
            problem = check_limits(headers, settings)
            if problem is not None:
                size = await send_problem(send, problem, extra_response_headers)
                return ProxyResult(problem.status, 0, size)

        client = scope.get("client")
        out_headers = request_headers(
            headers,
            client=client[0] if client else None,
            scheme=scope.get("scheme", "http"),
            trusted=self.trusted,
        )
        out_headers.extend(upstream_headers)
        target = path + b"?" + query if query else path
        upload = _Upload(receive, settings.max_body_bytes)
        started = time.perf_counter()
        upstream_ms = 0.0
        try:
            to = origin(upstream)
            if _bodyless(scope, headers):
                first, more = b"", False
                upload.finished = True
            else:
                first, more = await upload.first()
            body: bytes | AsyncIterator[bytes] = upload.rest(first) if more else first
            resp = await self.client.request(
                to, scope["method"].encode("ascii"), target, out_headers, body)
            try:
                upstream_ms = (time.perf_counter() - started) * 1000
                resp_headers, units_raw = response_headers(resp.headers)
                resp_headers.extend(extra_response_headers)
                upload.responding = True
                await _send(send, upload, {
                    "type": "http.response.start", "status": resp.status, "headers": resp_headers,
                })
                await _stream_body(resp, receive, send, upload)
            finally:
                resp.release()
            return ProxyResult(
                resp.status, upload.received, upload.sent, parse_units(units_raw), upstream_ms
            )
        except (UpstreamError, _ClientGone, _TooLarge, ValueError) as exc:
            return await self._failed(exc, upload, send, upstream_ms, extra_response_headers,
                                      upstream)

    async def _failed(
        self,
        exc: BaseException,
        upload: _Upload,
        send: Send,
        upstream_ms: float,
        extra_headers: Sequence[Header],
        target: str,
    ) -> ProxyResult:
        """Turn a failure into what the client sees, if anything can still be said."""
        if upload.gone:
            return ProxyResult(CLIENT_CLOSED, upload.received, upload.sent, {}, upstream_ms, True)
        if upload.responding:
            # Headers are out: the only honest signal left is cutting the connection, which
            # the server does when the app returns without finishing the body.
            log.warning("response from %s cut off: %r", target, exc)
            status = 504 if isinstance(exc, TimeoutError) else 502
            return ProxyResult(status, upload.received, upload.sent, {}, upstream_ms, True)
        if upload.too_large:
            problem = _too_large(self.settings)
        elif isinstance(exc, TimeoutError):
            log.warning("upstream %s timed out: %r", target, exc)
            problem = Problem(504, "the upstream service did not answer in time")
        elif isinstance(exc, ValueError):
            log.warning("request for %s not forwarded: %s", target, exc)
            problem = Problem(400, f"the request cannot be forwarded: {exc}")
        else:
            log.warning("upstream %s failed: %r", target, exc)
            problem = Problem(502, "the upstream service could not be reached")
        size = await send_problem(send, problem, extra_headers)
        return ProxyResult(problem.status, upload.received, size, {}, upstream_ms)


async def _send(send: Send, upload: _Upload, message: Message) -> None:
    try:
        await send(message)
    except OSError as exc:  # ASGI servers that report a vanished client this way
        upload.gone = True
        raise _ClientGone from exc


async def _stream_body(resp: Response, receive: Receive, send: Send, upload: _Upload) -> None:
    """Copy the upstream body to the client chunk by chunk. `send` blocks while the client is
    slow, which is the backpressure; but some servers (granian) silently swallow sends once
    the client is gone, so past the first megabyte a watcher on `receive` notices the
    disconnect and stops the copy. Small responses never pay for the watcher task."""
    length = resp.content_length()
    if length is not None and length <= _SMALL_BODY_BYTES:
        # Bounded by the upstream's own Content-Length: one read and one send instead of a
        # chunk loop, the common case for API responses.
        body = await resp.read()
        upload.sent += len(body)
        await _send(send, upload, {"type": "http.response.body", "body": body,
                                   "more_body": False})
        return
    watch: asyncio.Future[Message] | None = None
    try:
        async for chunk in resp.iter_chunks():
            upload.sent += len(chunk)
            await _send(send, upload, {"type": "http.response.body", "body": chunk,
                                       "more_body": True})
            if upload.sent > _WATCH_AFTER_BYTES and upload.finished:
                if watch is None:
                    watch = asyncio.ensure_future(receive())
                elif watch.done():
                    if _disconnected(watch):
                        upload.gone = True
                        raise _ClientGone
                    watch = None  # not a disconnect (off-spec server): watch again
        await _send(send, upload, {"type": "http.response.body", "body": b"",
                                   "more_body": False})
    finally:
        if watch is not None and not watch.done():
            watch.cancel()


def _disconnected(watch: asyncio.Future[Message]) -> bool:
    if watch.cancelled():
        return False
    if watch.exception() is not None:  # the server could not read the connection any more
        return True
    return bool(watch.result()["type"] == "http.disconnect")
