"""gateway.upstream against real, scripted upstreams on loopback that misbehave on cue.

Each test runs an `asyncio.start_server` whose handler plays one upstream's part byte by
byte, so what is checked is what the client does on the wire: connections opened and
reused, bytes sent, and the typed failure it reports.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.upstream import (
    _HIGH_WATER,
    ConnectFailed,
    Response,
    UpstreamBroken,
    UpstreamClient,
    UpstreamTimeout,
    origin,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Upstream:
    """A loopback server running `handler` per connection; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.requests: list[Request] = []
        self.url = ""
        self._tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Upstream]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def read_request(self, reader: asyncio.StreamReader) -> Request:
        request = await Request.read(reader)
        self.requests.append(request)
        return request


class Request:
    """One request as the upstream received it, body de-chunked."""

    def __init__(self, line: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.line = line
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        found = [v for n, v in self.headers if n.lower() == name]
        assert len(found) <= 1, self.headers
        return found[0] if found else None

    @classmethod
    async def read_head(cls, reader: asyncio.StreamReader) -> Request:
        raw = await reader.readuntil(b"\r\n\r\n")
        line, *lines = raw[:-4].split(b"\r\n")
        headers = [(n, v.strip()) for n, _, v in (h.partition(b":") for h in lines)]
        return cls(line, headers, b"")

    @classmethod
    async def read(cls, reader: asyncio.StreamReader) -> Request:
        request = await cls.read_head(reader)
        length = request.header(b"content-length")
        if length is not None:
            request.body = await reader.readexactly(int(length))
        elif request.header(b"transfer-encoding") == b"chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                parts.append(await reader.readexactly(size))
                assert await reader.readexactly(2) == b"\r\n"
            assert await reader.readexactly(2) == b"\r\n"
            request.body = b"".join(parts)
        return request


def serve_forever(answer: bytes) -> Handler:
    """A well-behaved keep-alive upstream answering every request with `answer`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await Request.read(reader)
            writer.write(answer)
            await writer.drain()

    return handler


@asynccontextmanager
async def upstream(handler: Handler) -> AsyncIterator[Upstream]:
    async with Upstream(handler).running() as server:
        yield server


@asynccontextmanager
async def client_for(**kwargs: float) -> AsyncIterator[UpstreamClient]:
    settings: dict[str, float] = {"connect_timeout_s": 2.0, "read_timeout_s": 5.0, **kwargs}
    client = UpstreamClient(**settings)  # type: ignore[arg-type]
    try:
        yield client
    finally:
        await client.close()


async def get(client: UpstreamClient, url: str, method: bytes = b"GET",
              target: bytes = b"/", body: bytes = b"") -> tuple[int, bytes]:
    resp = await client.request(origin(url), method, target, [], body)
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


async def eventually(check: Callable[[], bool]) -> None:
    """Wait for a state the event loop reaches on its own (a close noticed, a waiter queued)."""
    async with asyncio.timeout(5):
        while not check():
            await asyncio.sleep(0.005)


async def never() -> None:
    await asyncio.Event().wait()


# --- keep-alive and the pool


async def test_keep_alive_reuses_one_connection() -> None:
    async with upstream(serve_forever(OK)) as up, client_for() as client:
        assert await get(client, up.url) == (200, b"ok")
        assert await get(client, up.url) == (200, b"ok")
        assert up.accepted == 1


async def test_idle_connection_closed_by_the_upstream_leaves_the_pool() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Request.read(reader)
        writer.write(OK)
        await writer.drain()

    async with upstream(once) as up, client_for() as client:
        assert await get(client, up.url) == (200, b"ok")
        await eventually(lambda: not any(client._idle.values()))
        assert await get(client, up.url) == (200, b"ok")
        assert up.accepted == 2


def closes_on_second_request(up_ref: list[Upstream]) -> Handler:
    """First connection answers once, then closes when the next request arrives without
    answering it: the keep-alive race. Later connections behave."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up = up_ref[0]
        first = up.accepted == 1
        await up.read_request(reader)
        writer.write(OK)
        await writer.drain()
        if first:
            await Request.read_head(reader)
            return
        while True:
            await up.read_request(reader)
            writer.write(OK)
            await writer.drain()

    return handler


async def test_get_is_retried_once_when_a_reused_connection_dies_unanswered() -> None:
    ref: list[Upstream] = []
    async with upstream(closes_on_second_request(ref)) as up, client_for() as client:
        ref.append(up)
        assert await get(client, up.url) == (200, b"ok")
        assert await get(client, up.url, target=b"/again") == (200, b"ok")
        assert up.accepted == 2
        assert [r.line for r in up.requests] == [b"GET / HTTP/1.1", b"GET /again HTTP/1.1"]


async def test_streamed_post_is_not_retried() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"payload"

    ref: list[Upstream] = []
    async with upstream(closes_on_second_request(ref)) as up, client_for() as client:
        ref.append(up)
        assert await get(client, up.url) == (200, b"ok")
        with pytest.raises(UpstreamBroken):
            await client.request(origin(up.url), b"POST", b"/", [], body())
        assert up.accepted == 1


async def test_pool_waiter_proceeds_when_a_connection_closes() -> None:
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    async with upstream(serve_forever(closing)) as up, \
            client_for(pool_size=2, connect_timeout_s=10, read_timeout_s=10) as client:
        to = origin(up.url)
        first = await client.request(to, b"GET", b"/", [])
        second = await client.request(to, b"GET", b"/", [])
        third = asyncio.create_task(client.request(to, b"GET", b"/", []))
        await eventually(lambda: len(client._slots) == 1)
        assert not third.done() and up.accepted == 2
        first.release()
        resp = await asyncio.wait_for(third, 5)
        assert await resp.read() == b"ok"
        for r in (second, resp):
            r.release()
        assert up.accepted == 3


async def test_pool_waiter_proceeds_when_a_connection_returns_to_the_pool() -> None:
    async with upstream(serve_forever(OK)) as up, \
            client_for(pool_size=2, connect_timeout_s=10, read_timeout_s=10) as client:
        to = origin(up.url)
        first = await client.request(to, b"GET", b"/", [])
        second = await client.request(to, b"GET", b"/", [])
        third = asyncio.create_task(client.request(to, b"GET", b"/", []))
        await eventually(lambda: len(client._slots) == 1)
        assert await first.read() == b"ok"
        first.release()  # complete and keep-alive: back to the pool
        try:
            resp = await asyncio.wait_for(third, 2)
        finally:
            second.release()
        assert await resp.read() == b"ok"
        resp.release()


async def test_idle_connection_of_another_origin_makes_room() -> None:
    a_closed = asyncio.Event()

    async def a_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Request.read(reader)
        writer.write(OK)
        await writer.drain()
        assert await reader.read() == b""
        a_closed.set()

    async with upstream(a_handler) as a, upstream(serve_forever(OK)) as b, \
            client_for(pool_size=1) as client:
        assert await get(client, a.url) == (200, b"ok")
        assert await get(client, b.url) == (200, b"ok")
        await asyncio.wait_for(a_closed.wait(), 5)
        assert client._open == 1


async def test_expired_idle_connection_is_not_reused() -> None:
    async with upstream(serve_forever(OK)) as up, client_for(keepalive_s=0.01) as client:
        assert await get(client, up.url) == (200, b"ok")
        await asyncio.sleep(0.05)
        assert await get(client, up.url) == (200, b"ok")
        assert up.accepted == 2


# --- response framing


async def test_informational_responses_are_skipped() -> None:
    answer = (b"HTTP/1.1 100 Continue\r\n\r\n"
              b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
              b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: 1\r\n\r\ndone")
    async with upstream(serve_forever(answer)) as up, client_for() as client:
        resp = await client.request(origin(up.url), b"GET", b"/", [])
        assert resp.status == 201
        assert resp.headers == [(b"Content-Length", b"4"), (b"X-Final", b"1")]
        assert await resp.read() == b"done"
        resp.release()
        assert await get(client, up.url) == (201, b"done")
        assert up.accepted == 1


async def test_head_announces_a_body_it_does_not_carry() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    async with upstream(serve_forever(head)) as up, client_for() as client:
        for _ in range(2):
            resp = await client.request(origin(up.url), b"HEAD", b"/", [])
            assert resp.status == 200 and resp.content_length() == 0
            assert await resp.read() == b""
            resp.release()
        assert up.accepted == 1


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\nETag: \"x\"\r\n\r\n",
])
async def test_no_body_statuses(answer: bytes) -> None:
    async with upstream(serve_forever(answer)) as up, client_for() as client:
        first = await get(client, up.url)
        assert first[1] == b"" and first[0] in (204, 304)
        assert await get(client, up.url) == first
        assert up.accepted == 1


async def test_chunked_response() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await Request.read(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in (b"hello ", b"chunked ", b"world"):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
            writer.write(b"0\r\nX-Trailer: t\r\n\r\n")

    async with upstream(chunked) as up, client_for() as client:
        resp = await client.request(origin(up.url), b"GET", b"/", [])
        assert resp.content_length() is None
        assert [c async for c in resp.iter_chunks()] == [b"hello ", b"chunked ", b"world"]
        resp.release()
        assert await get(client, up.url) == (200, b"hello chunked world")
        assert up.accepted == 1


async def test_body_delimited_by_close_is_complete() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Request.read(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart one, ")
        await writer.drain()
        writer.write(b"part two")

    async with upstream(until_close) as up, client_for() as client:
        assert await get(client, up.url) == (200, b"part one, part two")
        assert await get(client, up.url) == (200, b"part one, part two")
        assert up.accepted == 2


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfour",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfour\r\n",
])
async def test_body_cut_short_is_broken(answer: bytes) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Request.read(reader)
        writer.write(answer)
        await writer.drain()

    async with upstream(cut) as up, client_for() as client:
        resp = await client.request(origin(up.url), b"GET", b"/", [])
        assert resp.status == 200
        with pytest.raises(UpstreamBroken):
            await resp.read()
        resp.release()


async def test_bytes_after_the_response_are_not_body() -> None:
    extra = OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"
    async with upstream(serve_forever(extra)) as up, client_for() as client:
        resp = await client.request(origin(up.url), b"GET", b"/", [])
        body = await resp.read()
        resp.release()
        assert (resp.status, resp.headers, body) == (200, [(b"Content-Length", b"2")], b"ok")


# --- failures


async def test_garbage_is_broken() -> None:
    async def ssh(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Request.read(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        await never()

    async with upstream(ssh) as up, client_for() as client:
        with pytest.raises(UpstreamBroken):
            await get(client, up.url)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connection_refused() -> None:
    async with client_for() as client:
        with pytest.raises(ConnectFailed):
            await get(client, f"http://127.0.0.1:{free_port()}")
        assert client._open == 0


@contextmanager
def blackhole() -> Iterator[int]:
    """A port whose SYNs go unanswered: a listener that never accepts, its queue full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_connect_timeout() -> None:
    with blackhole() as port:
        async with client_for(connect_timeout_s=0.2) as client:
            with pytest.raises(ConnectFailed, match="timed out"):
                await get(client, f"http://127.0.0.1:{port}")
            assert client._open == 0


async def test_headers_never_sent_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Request.read(reader)
        await never()

    async with upstream(silent) as up, client_for(read_timeout_s=0.2) as client:
        with pytest.raises(UpstreamTimeout):
            await get(client, up.url)
        assert issubclass(UpstreamTimeout, TimeoutError)


async def test_body_stalling_midway_times_out() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Request.read(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst part")
        await writer.drain()
        await never()

    async with upstream(stall) as up, client_for(read_timeout_s=0.2) as client:
        resp = await client.request(origin(up.url), b"GET", b"/", [])
        chunks = resp.iter_chunks()
        assert await anext(chunks) == b"first part"
        with pytest.raises(UpstreamTimeout):
            await anext(chunks)
        resp.release()


async def test_control_characters_in_headers_send_nothing() -> None:
    async with upstream(serve_forever(OK)) as up, client_for() as client:
        for bad in ([(b"X-A", b"a\r\nX-Injected: 1")], [(b"X-A", b"a\nb")],
                    [(b"X-A", b"a\0b")], [(b"X-A\r\nX-B", b"1")]):
            with pytest.raises(ValueError):
                await client.request(origin(up.url), b"GET", b"/", bad)
        assert up.accepted == 0 and client._open == 0
        assert await get(client, up.url) == (200, b"ok")


# --- request bodies


def recording(up_ref: list[Upstream]) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await up_ref[0].read_request(reader)
            writer.write(OK)
            await writer.drain()

    return handler


async def test_request_bodies_are_framed() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"alpha,", b"", b"beta," * 1000, b"gamma"):
            yield part

    async def raw() -> AsyncIterator[bytes]:
        yield b"0123"
        yield b"456789"

    ref: list[Upstream] = []
    async with upstream(recording(ref)) as up, client_for() as client:
        ref.append(up)
        to = origin(up.url)
        for method, headers, body in (
            (b"POST", [], b"bytes body"),
            (b"POST", [], chunks()),
            (b"PUT", [(b"Content-Length", b"10")], raw()),
            (b"POST", [], b""),
            (b"GET", [], b""),
        ):
            resp = await client.request(to, method, b"/", headers, body)
            assert await resp.read() == b"ok"
            resp.release()
        sized, chunked, declared, empty_post, get_ = up.requests
        assert (sized.header(b"content-length"), sized.body) == (b"10", b"bytes body")
        assert sized.header(b"transfer-encoding") is None
        assert chunked.header(b"transfer-encoding") == b"chunked"
        assert chunked.header(b"content-length") is None
        assert chunked.body == b"alpha," + b"beta," * 1000 + b"gamma"
        assert declared.header(b"transfer-encoding") is None
        assert (declared.header(b"content-length"), declared.body) == (b"10", b"0123456789")
        assert empty_post.header(b"content-length") == b"0"
        assert get_.header(b"content-length") is None and get_.header(b"transfer-encoding") is None
        assert up.accepted == 1


async def test_early_answer_to_an_upload_is_returned_and_not_reused() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Request.read_head(reader)
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        while await reader.read(65536):  # keep the connection open, as servers do
            pass

    gave_up = asyncio.Event()

    async def upload() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        try:
            await never()
        finally:
            gave_up.set()
        yield b"never sent"

    async with upstream(refuse) as up, client_for() as client:
        resp = await client.request(origin(up.url), b"POST", b"/", [], upload())
        assert (resp.status, await resp.read()) == (413, b"big")
        resp.release()
        await asyncio.wait_for(gave_up.wait(), 5)
        assert not any(client._idle.values())
        assert up.accepted == 1


async def test_slow_upload_is_not_a_read_timeout() -> None:
    ref: list[Upstream] = []

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(8):
            await asyncio.sleep(0.05)
            yield b"."

    async with upstream(recording(ref)) as up, client_for(read_timeout_s=0.2) as client:
        ref.append(up)
        resp = await client.request(origin(up.url), b"POST", b"/", [], trickle())
        assert await resp.read() == b"ok"
        resp.release()


# --- flow control


async def test_large_response_read_slowly_stays_bounded() -> None:
    size = 64 * 1024 * 1024
    piece = b"z" * (1024 * 1024)

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Request.read(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(piece)):
            writer.write(piece)
            await writer.drain()
        await never()

    bound = 1024 * 1024  # high-water mark plus one socket read; far below the 64 MiB sent
    async with upstream(big) as up, client_for() as client:
        resp: Response = await client.request(origin(up.url), b"GET", b"/", [])
        conn = resp._conn
        await asyncio.sleep(0.1)  # let the upstream push as much as the client takes
        most = conn.buffered
        total = 0
        async for chunk in resp.iter_chunks():
            total += len(chunk)
            most = max(most, conn.buffered)
            if total % (8 * 1024 * 1024) < len(chunk):
                await asyncio.sleep(0.01)  # a slow reader now and then
        resp.release()
        assert total == size
        assert most <= bound


async def test_abandoned_paused_response_does_not_poison_the_pool() -> None:
    first, last = b"y" * (_HIGH_WATER - 10), b"y" * 20  # the last bytes cross the mark
    length = len(first) + len(last)
    go = asyncio.Event()

    async def in_two(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Request.read(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (length, first))
        await writer.drain()
        await go.wait()
        writer.write(last)
        await serve_forever(OK)(reader, writer)

    async with upstream(in_two) as up, client_for(read_timeout_s=1) as client:
        resp = await client.request(origin(up.url), b"GET", b"/", [])
        await eventually(lambda: resp._conn.buffered == len(first))
        go.set()
        await eventually(lambda: resp._conn.complete)
        resp.release()  # the client went away: body left unread
        assert await get(client, up.url) == (200, b"ok")
        assert up.accepted == 1


# --- where requests go


def test_origin_host_header_and_base() -> None:
    assert origin("http://example.com").host_header == b"example.com"
    assert origin("http://example.com:80/").host_header == b"example.com"
    assert origin("https://example.com:443").host_header == b"example.com"
    assert origin("https://example.com:80").host_header == b"example.com:80"
    assert origin("http://example.com:8080").host_header == b"example.com:8080"
    v6 = origin("http://[::1]:8080/api/v1/")
    assert (v6.host, v6.port, v6.host_header, v6.base) == ("::1", 8080, b"[::1]:8080", b"/api/v1")
    assert origin("https://[2001:db8::1]/").host_header == b"[2001:db8::1]"
    assert origin("http://Example.COM/").base == b""
    for bad in ("ftp://example.com", "http:///path", "example.com"):
        with pytest.raises(ValueError):
            origin(bad)


async def test_host_header_and_base_path_on_the_wire() -> None:
    ref: list[Upstream] = []
    async with upstream(recording(ref)) as up, client_for() as client:
        ref.append(up)
        resp = await client.request(origin(up.url + "/base/"), b"GET", b"/v1/x?q=1",
                                    [(b"X-Trace", b"t1")])
        resp.release()
        request = up.requests[0]
        assert request.line == b"GET /base/v1/x?q=1 HTTP/1.1"
        assert request.header(b"host") == up.url.removeprefix("http://").encode()
        assert request.header(b"x-trace") == b"t1"


def _tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An internal CA, and a server certificate it signed for `localhost` and 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("tollway test CA"))
          .issuer_name(name("tollway test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(alt, critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_file, cert_file, key_file


async def test_https_upstream_is_verified_against_the_configured_ca(tmp_path: Path) -> None:
    ca_file, cert_file, key_file = _tls_files(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert_file, key_file)
    seen = Upstream(serve_forever(OK))
    server = await asyncio.start_server(seen._serve, "127.0.0.1", 0, ssl=served)
    port = server.sockets[0].getsockname()[1]
    try:
        trusting = UpstreamClient(ca_file=str(ca_file))
        try:
            for host in ("localhost", "127.0.0.1"):  # a name and an address, both verified
                assert await get(trusting, f"https://{host}:{port}") == (200, b"ok")
                assert await get(trusting, f"https://{host}:{port}") == (200, b"ok")
            assert seen.accepted == 2  # kept alive over TLS, one connection per origin
        finally:
            await trusting.close()
        # Without the internal CA the certificate is not trusted: a connect failure, not
        # a request sent in the clear or to an unverified peer.
        default = UpstreamClient()
        try:
            with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
                await get(default, f"https://localhost:{port}")
        finally:
            await default.close()
        # The CA is trusted, but the certificate does not name this host.
        other = UpstreamClient(ca_file=str(ca_file))
        try:
            with pytest.raises(ConnectFailed):
                await get(other, f"https://127.0.0.2:{port}")
        finally:
            await other.close()
    finally:
        server.close()
        for task in seen._tasks:
            task.cancel()
        await asyncio.gather(*seen._tasks, return_exceptions=True)
