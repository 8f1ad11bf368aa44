"""The proxy's HTTP/1.1 client: pooled keep-alive connections to upstream origins.

Why not aiohttp: the proxy already has the client's headers as bytes and only needs bytes
back. aiohttp's request machinery (header multidicts, URL objects, auto headers, cookie and
redirect handling, a task per body writer) cost about 100 µs of CPU per request here, more
than the rest of the gateway together (benchmarks/RESULTS.md, "Hot path CPU"). This client
writes the request head with one `write`, parses the response with llhttp (httptools) in
`data_received`, and hands the body over chunk by chunk.

What it owes the proxy:
- streaming both ways, with flow control: reading pauses while a response's unread chunks
  pass `_HIGH_WATER`, and request bodies wait for the transport to drain;
- an idle connection the upstream closed is noticed when it closes (it leaves the pool at
  once), and a request whose reused connection dies before any response byte is retried once
  on a new connection, when its body can be replayed: the race every keep-alive client has;
- a connection is reused only after a complete response that allows keep-alive, with the
  request fully sent;
- failures are typed: `ConnectFailed` (502), `UpstreamTimeout` (504), `UpstreamBroken` (502,
  or a cut-off response once headers are out).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import cast
from urllib.parse import urlsplit

import httptools

Header = tuple[bytes, bytes]

_HIGH_WATER = 256 * 1024  # unread response bytes at which reading pauses
_LOW_WATER = 64 * 1024
_REPLAYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_BODYLESS_EMPTY = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT"})


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    """No connection could be made: refused, unreachable, or the connect timed out."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream stopped sending for longer than the read timeout."""


class UpstreamBroken(UpstreamError):
    """The upstream closed the connection early or sent something that is not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: an upstream URL split once, `base` being its path prefix."""

    scheme: str
    host: str
    port: int
    host_header: bytes
    base: bytes
    key: tuple[str, str, int]  # what the pool is keyed on


@lru_cache(maxsize=1024)
def origin(url: str) -> Origin:
    """An upstream URL (`http[s]://host[:port][/base]`) as an Origin; routing hands out a few
    distinct URLs, so each is parsed once."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream must be an http(s) URL with a host: {url!r}")
    default = 443 if parts.scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    header = shown if port == default else f"{shown}:{port}"
    return Origin(parts.scheme, host, port, header.encode("ascii"),
                  parts.path.rstrip("/").encode("ascii"), (parts.scheme, host, port))


def request_head(method: bytes, target: bytes, origin: Origin,
                 headers: Sequence[Header]) -> bytes:
    """The request line and headers, ready to write. Values crossing into another message
    must not carry CR, LF or NUL (request smuggling): the ASGI server's parser rejects them
    in what the client sent, and this holds the line for what the gateway adds. Checked on
    the joined block, where the separators are the only CR/LF allowed: a third of the cost
    of checking every value."""
    if b" " in target or b"\r" in target or b"\n" in target or b"\0" in target:
        raise ValueError("the request target carries a space or a control character")
    block = b"\r\n".join([b"%s: %s" % header for header in headers])
    separators = len(headers) - 1 if headers else 0
    if block.count(b"\n") != separators or block.count(b"\r") != separators or b"\0" in block:
        raise ValueError("a header carries a control character")
    if headers:
        return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n\r\n" % (
            method, target, origin.host_header, block)
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (method, target, origin.host_header)


class _Connection(asyncio.Protocol):
    """One upstream connection, and the response currently being read on it."""

    def __init__(self, client: UpstreamClient, key: tuple[str, str, int]) -> None:
        self.loop = asyncio.get_running_loop()  # built by create_connection, in the loop
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.counted = True  # in the client's count of open connections
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self.active = False  # a response is expected
        self._head_only = False
        self._informational = False
        self._head: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timeout_s = 0.0
        self.progress = 0.0
        self.status = 0
        self.headers: list[Header] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.failure: UpstreamError | None = None

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or not self.active:  # bytes nobody asked for: not to be trusted
            self._abort(UpstreamBroken("upstream sent data outside a response"))
            return
        if self.complete:  # more than the response: never reuse this connection
            self.keep_alive = False
            return
        self.got_bytes = True
        self.progress = self.loop.time()
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._abort(UpstreamBroken(f"invalid HTTP response: {exc}"))

    def eof_received(self) -> bool:
        return False  # close; a half-closed upstream connection is of no further use

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client._lost(self)
        if self.active and not self.complete and self.failure is None:
            if self._head is not None and self._head.done() and self._ends_at_eof():
                self.complete = True  # a body delimited by the connection's close
                self.keep_alive = False
            else:
                reason = f": {exc}" if exc else ""
                self.failure = UpstreamBroken(f"upstream closed the connection early{reason}")
        _settle(self._waiter, self._head, self._drain)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        _settle(self._drain)

    # --- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            self.keep_alive = False
            return
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        if self.complete:  # a second response in the same packet
            self.keep_alive = False
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._informational = True  # 100 Continue, 103 Early Hints: the real answer follows
            self.headers = []
            return
        self.status = status
        _settle(self._head)
        if self._head_only:  # a HEAD response announces a body it does not carry
            self._finish()

    def on_body(self, body: bytes) -> None:
        if self.complete:  # a body after a HEAD response, or after the response's end
            self.keep_alive = False
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self.complete:
            self.keep_alive = False
            return
        self._finish()

    # --- used by UpstreamClient and Response

    def _finish(self) -> None:
        assert self._parser is not None
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    def sender_done(self, sender: asyncio.Task[None]) -> None:
        """A request body that failed (client gone, too large) ends the exchange: nothing
        else would stop the wait for an answer to a request that was never finished."""
        if not sender.cancelled() and sender.exception() is not None and not self.complete:
            self._abort(UpstreamBroken(f"request body failed: {sender.exception()!r}"))

    def _ends_at_eof(self) -> bool:
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length" or (
                lower == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                return False
        return True

    def _abort(self, failure: UpstreamError) -> None:
        if self.failure is None:
            self.failure = failure
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        _settle(self._waiter)

    def start(self, head_only: bool) -> None:
        """Ready for the next response. llhttp resets itself after each complete response, so
        the parser is kept, except around HEAD: its response announces a body that never
        comes, which would leave the parser waiting for it."""
        if self._parser is None or head_only or self._head_only:
            self._parser = httptools.HttpResponseParser(self)
        self.active = True
        self._head_only = head_only
        self._informational = False
        self._head = None
        self.status = 0
        self.headers = []
        self.chunks.clear()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.failure = None

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain = self.loop.create_future()
            await self._drain
        if self.closed and not self.complete:
            raise self.failure or UpstreamBroken("upstream closed the connection")

    async def head(self, timeout_s: float) -> None:
        if self.failure is not None:
            raise self.failure
        if self.status:
            return
        self._head = self.loop.create_future()
        self._arm(timeout_s)
        try:
            await self._head
        finally:
            self._disarm()
        if self.failure is not None:
            raise self.failure

    async def chunk(self, timeout_s: float) -> bytes:
        """The next body chunk, b"" at the end of the body."""
        while not self.chunks:
            if self.complete:
                return b""
            if self.failure is not None:
                raise self.failure
            self._waiter = self.loop.create_future()
            self._arm(timeout_s)
            try:
                await self._waiter
            finally:
                self._disarm()
                self._waiter = None
        data = self.chunks.popleft()
        self.buffered -= len(data)
        if self._read_paused and self.buffered < _LOW_WATER and self.transport:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    def _arm(self, timeout_s: float) -> None:
        """The read timeout counts from the last sign of life: a byte received, or a chunk of
        the request body written (an upstream waits for the whole upload before answering).
        One timer handle per wait, re-armed only when it fires early; asyncio.timeout would
        cost twice as much on every request."""
        loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self.progress = loop.time()
        self._timer = loop.call_later(timeout_s, self._check_idle)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_idle(self) -> None:
        idle = self.loop.time() - self.progress
        if idle < self._timeout_s:
            self._timer = self.loop.call_later(self._timeout_s - idle, self._check_idle)
            return
        self._timer = None
        self._abort(UpstreamTimeout("the upstream sent nothing within the read timeout"))
        _settle(self._waiter, self._head)


class Response:
    """An upstream response whose body is still on the wire. `release()` must follow, once
    the body was read or abandoned: it returns the connection to the pool or closes it."""

    __slots__ = ("_client", "_conn", "_sender", "_timeout_s", "headers", "status")

    def __init__(self, client: UpstreamClient, conn: _Connection,
                 sender: asyncio.Task[None] | None, timeout_s: float) -> None:
        self._client = client
        self._conn = conn
        self._sender = sender
        self._timeout_s = timeout_s
        self.status = conn.status
        self.headers = conn.headers

    def content_length(self) -> int | None:
        if self._conn._head_only:
            return 0
        for name, value in self.headers:
            if name.lower() == b"content-length" and value.isdigit():
                return int(value)
        return None

    async def read(self) -> bytes:
        """The whole body: only for bodies the caller knows to be small."""
        conn = self._conn
        parts = []
        while chunk := await conn.chunk(self._timeout_s):
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while chunk := await conn.chunk(self._timeout_s):
            yield chunk

    def release(self) -> None:
        sender = self._sender
        sent = sender is None or (sender.done() and not sender.cancelled()
                                  and sender.exception() is None)
        if sender is not None and not sender.done():
            sender.cancel()
        self._client._release(self._conn, reusable=sent)


class UpstreamClient:
    """Keep-alive connections to upstream origins, at most `pool_size` open in all."""

    def __init__(self, *, pool_size: int = 256, connect_timeout_s: float = 2.0,
                 read_timeout_s: float = 30.0, keepalive_s: float = 30.0,
                 ca_file: str | None = None) -> None:
        self.pool_size = pool_size
        self.ca_file = ca_file
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open = 0
        self._slots: deque[asyncio.Future[None]] = deque()
        self._tls: ssl.SSLContext | None = None
        self._closing = False

    async def request(
        self,
        to: Origin,
        method: bytes,
        target: bytes,
        headers: Sequence[Header],
        body: bytes | AsyncIterator[bytes] = b"",
    ) -> Response:
        """Send a request and return once the response headers are in. `target` is the
        path and query, already percent-encoded; `to.base` is prepended. A `bytes` body is
        sent with its Content-Length unless `headers` declare one; an iterator is sent as
        it comes (chunked, unless `headers` declare a Content-Length)."""
        head_only = method == b"HEAD"
        streamed = not isinstance(body, bytes)
        declared = _declares_length(headers)
        extra: list[Header] = []
        if streamed and not declared:
            extra.append((b"Transfer-Encoding", b"chunked"))
        elif isinstance(body, bytes) and not declared and (body or method not in _BODYLESS_EMPTY):
            extra.append((b"Content-Length", str(len(body)).encode()))
        head = request_head(method, to.base + target, to, [*headers, *extra] if extra else headers)
        if isinstance(body, bytes) and body:
            head += body
        chunked = streamed and not declared

        for attempt in (0, 1):
            conn, reused = await self._acquire(to)
            conn.start(head_only)
            assert conn.transport is not None
            conn.transport.write(head)
            sender = None
            if streamed:
                assert not isinstance(body, bytes)
                sender = asyncio.get_running_loop().create_task(_send_body(conn, body, chunked))
                sender.add_done_callback(conn.sender_done)
            try:
                await conn.head(self.read_timeout_s)
            except UpstreamBroken:
                if sender is not None:
                    sender.cancel()
                self._release(conn, reusable=False)
                if attempt == 0 and reused and not conn.got_bytes and not streamed and (
                        method in _REPLAYABLE):
                    continue  # a keep-alive connection the upstream closed under us
                raise
            except BaseException:
                if sender is not None:
                    sender.cancel()
                self._release(conn, reusable=False)
                raise
            return Response(self, conn, sender, self.read_timeout_s)
        raise AssertionError("unreachable")

    async def _acquire(self, to: Origin) -> tuple[_Connection, bool]:
        """A pooled connection to `to` (True) or a new one (False). At the pool's limit the
        oldest idle connection to another origin makes way; failing that, the request waits
        for a connection to come back or close (bounded: waiting for the pool counts as
        part of the connect)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout_s + self.read_timeout_s
        while True:
            conn = self._pooled(to.key, loop.time())
            if conn is not None:
                return conn, True
            if self._open < self.pool_size or self._evict():
                self._open += 1
                return await self._connect(to), False
            waiter = loop.create_future()
            self._slots.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise ConnectFailed("no upstream connection free in the pool") from None
            except asyncio.CancelledError:
                if waiter.done():
                    self._wake_one()  # the wake-up this request got is not lost with it
                raise
            finally:
                if waiter in self._slots:
                    self._slots.remove(waiter)

    def _pooled(self, key: tuple[str, str, int], now: float) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.keepalive_s:
                assert conn.transport is not None
                conn.transport.close()
                continue
            return conn
        return None

    def _evict(self) -> bool:
        """Close the longest idle connection, of whatever origin, to make room."""
        oldest = min((c for conns in self._idle.values() for c in conns),
                     key=lambda c: c.idle_since, default=None)
        if oldest is None:
            return False
        self._idle[oldest.key].remove(oldest)
        self._open -= 1  # uncounted now, not when its connection_lost runs
        oldest.counted = False
        assert oldest.transport is not None
        oldest.transport.close()
        return True

    async def _connect(self, to: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if to.scheme == "https":
            if self._tls is None:
                # Verified, always: the system's CAs, plus an internal CA if configured.
                self._tls = ssl.create_default_context()
                if self.ca_file is not None:
                    self._tls.load_verify_locations(cafile=self.ca_file)
            tls = self._tls
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, to.key), to.host, to.port, ssl=tls,
                    server_hostname=to.host if tls else None,
                )
        except TimeoutError:
            self._freed()
            raise ConnectFailed(f"connect to {to.host}:{to.port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            self._freed()
            raise ConnectFailed(f"connect to {to.host}:{to.port} failed: {exc}") from exc
        except BaseException:
            self._freed()
            raise
        return conn

    def _release(self, conn: _Connection, *, reusable: bool) -> None:
        if (reusable and conn.complete and conn.keep_alive and not conn.closed
                and not self._closing):
            conn.active = False
            conn.chunks.clear()
            conn.buffered = 0
            if conn._read_paused and conn.transport is not None:
                conn._read_paused = False
                conn.transport.resume_reading()
            conn.idle_since = asyncio.get_running_loop().time()
            self._idle.setdefault(conn.key, []).append(conn)
            self._wake_one()
            return
        if conn.transport is not None and not conn.closed:
            conn.transport.close()

    def _lost(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        if conn.counted:
            conn.counted = False
            self._freed()

    def _freed(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._slots:
            waiter = self._slots.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closing = True
        for conns in self._idle.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports' connection_lost run


def _settle(*futures: asyncio.Future[None] | None) -> None:
    """Wake whoever waits on these futures, if anyone still does."""
    for future in futures:
        if future is not None and not future.done():
            future.set_result(None)


def _declares_length(headers: Sequence[Header]) -> bool:
    return any(len(name) == 14 and name.lower() == b"content-length" for name, _ in headers)


async def _send_body(conn: _Connection, body: AsyncIterator[bytes], chunked: bool) -> None:
    """Stream a request body; runs beside the wait for the response, which may come first
    (an upstream refusing an upload answers before reading it)."""
    transport = conn.transport
    assert transport is not None
    async for chunk in body:
        if conn.closed:
            break
        if chunk:
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            conn.progress = conn.loop.time()
            await conn.drain()
    if chunked and not conn.closed:
        transport.write(b"0\r\n\r\n")
