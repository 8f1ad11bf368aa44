"""One multiplexed, pipelined Redis connection per process, for the gateway's hot path.

Every concurrent request shares one RESP2 connection: commands queued during an event-loop
turn go out in one `transport.write`, and replies (parsed by hiredis) complete the callers'
futures in the order the commands were sent. Compared with redis-py's pool this saves, per
call, a pool checkout and release, a `StreamWriter` write and a send syscall; and a caller
that gives up (its `asyncio.timeout`) only abandons its future, so its late reply is
discarded instead of costing the connection. See docs/admission.md, "The Redis link".

A call may carry a reply deadline (`execute(packed, timeout_s)`), counted from the moment
its bytes were written, and enforced by one timer per connection rather than one
`asyncio.timeout` per call. The point is what a timeout means: Redis did not answer in time.
A per-call timer also fires when the reply came on time but this process's event loop was too
busy to read it (CPU overload), and that turned overload into refusals (503s) and an open
breaker. So when a deadline passes while reply bytes sit unread in the socket, the verdict
waits for the loop to read them.
"""

from __future__ import annotations

import asyncio
import select
import ssl
from collections import deque
from itertools import islice
from typing import Any, cast
from urllib.parse import unquote

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url

HANG_S = 5.0  # no reply for this long to the oldest outstanding command: the server is gone
_RECHECK_S = 0.001  # a deadline met by unread reply bytes is looked at again after a loop turn
_MORE = object()  # hiredis's "not enough data yet"


class ReplyError(Exception):
    """An error reply from Redis; the message is the server's (`NOSCRIPT ...`, `WRONGTYPE ...`)."""

    @property
    def noscript(self) -> bool:
        """The script is not in the server's cache (flushed, restarted, failed over)."""
        return str(self).startswith("NOSCRIPT")


def pack(*args: bytes) -> bytes:
    """One command in RESP, from its already-encoded arguments."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    """The protocol side: a write buffer flushed once per loop turn, and a FIFO of futures."""

    def __init__(self, loop: asyncio.AbstractEventLoop, hang_s: float) -> None:
        self.loop = loop
        self.hang_s = hang_s
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ReplyError, notEnoughData=_MORE)
        # [future, time written (0 until then), reply timeout (0: none)] per command, oldest
        # first; abandoned futures stay until answered, to keep replies matched in order
        self.pending: deque[list[Any]] = deque()
        self.buffer: list[bytes] = []
        self.lost = False
        self.closed: asyncio.Future[None] = loop.create_future()
        self._watchdog: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_at = 0.0
        self._poll: select.poll | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # poll, not select: a busy gateway holds more than select's 1,024 descriptors
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)

    def send(self, packed: bytes, timeout_s: float = 0.0) -> asyncio.Future[Any]:
        if self.lost:
            raise ConnectionError("redis connection lost")
        future = self.loop.create_future()
        self.pending.append([future, 0.0, timeout_s])
        if not self.buffer:
            self.loop.call_soon(self._flush)
        self.buffer.append(packed)
        return future

    def _flush(self) -> None:
        buffered = len(self.buffer)
        if buffered and not self.lost and self.transport is not None:
            self.transport.write(b"".join(self.buffer))
            now = self.loop.time()
            earliest = 0.0
            for entry in islice(reversed(self.pending), buffered):
                entry[1] = now
                if entry[2] and (not earliest or entry[2] < earliest):
                    earliest = entry[2]
            if earliest and (self._deadline is None or now + earliest < self._deadline_at):
                self._arm_deadline(now + earliest)
            if self._watchdog is None:
                self._watchdog = self.loop.call_at(now + self.hang_s, self._check_hang)
        self.buffer.clear()

    def _arm_deadline(self, when: float) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline_at = when
        self._deadline = self.loop.call_at(when, self._check_deadlines)

    def _check_deadlines(self) -> None:
        """Fail the calls whose reply is overdue, unless reply bytes are waiting to be read:
        then Redis did answer and the loop is late, so look again once it has read them."""
        self._deadline = None
        if self.lost:
            return
        now = self.loop.time()
        overdue: list[asyncio.Future[Any]] = []
        upcoming = 0.0
        for future, written, timeout_s in self.pending:
            if not written:
                break  # not sent yet, nor anything after it
            if not timeout_s or future.done():
                continue
            due = written + timeout_s
            if due <= now:
                overdue.append(future)
            elif not upcoming or due < upcoming:
                upcoming = due
        if overdue and self._unread():
            self._arm_deadline(now + _RECHECK_S)
            return
        for future in overdue:
            future.set_exception(TimeoutError("redis did not answer in time"))
        if upcoming:
            self._arm_deadline(upcoming)

    def _unread(self) -> bool:
        """Bytes (or a hang-up, which connection_lost will deal with) wait in the socket."""
        if self._poll is None:
            return False
        try:
            return bool(self._poll.poll(0))
        except OSError:
            return False

    def data_received(self, data: bytes) -> None:
        reader, pending = self.reader, self.pending
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(ConnectionError(f"redis protocol error: {exc}"))
                return
            if reply is _MORE:
                return
            if not pending:
                self._fail(ConnectionError("redis sent a reply nobody asked for"))
                return
            future = pending.popleft()[0]
            if not future.done():  # else its caller gave up: the reply is dropped
                if isinstance(reply, ReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    def _check_hang(self) -> None:
        self._watchdog = None
        if not self.pending or self.lost:
            return
        written = self.pending[0][1] or self.loop.time()
        due = written + self.hang_s
        if self.loop.time() >= due:
            self._fail(ConnectionError(f"redis sent no reply for {self.hang_s} s"))
        else:
            self._watchdog = self.loop.call_at(due, self._check_hang)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(ConnectionError(f"redis connection lost: {exc or 'closed'}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, exc: ConnectionError) -> None:
        """Mark the connection dead, fail everything outstanding and drop the socket."""
        self.lost = True
        self.buffer.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        while self.pending:
            future = self.pending.popleft()[0]
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class RedisLink:
    """A lazily connected, self-reconnecting pipelined connection. Not thread-safe: one event
    loop uses it. Timeouts are the caller's; `hang_s` only bounds a server that stopped
    answering altogether, which would otherwise pile up abandoned commands forever."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout_s: float = 2.0,
        hang_s: float = HANG_S,
    ) -> None:
        self.host, self.port, self.path, self.db = host, port, path, db
        self.username, self.password = username, password
        self.ssl_context = ssl_context
        self.connect_timeout_s = connect_timeout_s
        self.hang_s = hang_s
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    @classmethod
    def from_url(
        cls, url: str, *, connect_timeout_s: float = 2.0, hang_s: float = HANG_S
    ) -> RedisLink:
        """redis://[user:pass@]host:port/db, rediss:// (TLS, verified), unix:///path?db=N."""
        opts = parse_url(url)
        password = opts.get("password")
        return cls(
            host=opts.get("host", "127.0.0.1"),
            port=int(opts.get("port", 6379)),
            path=opts.get("path"),
            db=int(opts.get("db") or 0),
            username=opts.get("username"),
            password=unquote(password) if password else None,
            ssl_context=(
                ssl.create_default_context() if opts.get("connection_class") is SSLConnection
                else None
            ),
            connect_timeout_s=connect_timeout_s,
            hang_s=hang_s,
        )

    async def execute(self, packed: bytes, timeout_s: float = 0.0) -> Any:
        """Send one packed command and return its reply; an error reply raises ReplyError, a
        lost or hung connection ConnectionError (the next call reconnects), and no reply
        within `timeout_s` of the command's write TimeoutError (0: no reply timeout; a
        connect still has its own)."""
        conn = self._conn
        if conn is None or conn.lost:
            conn = await self._connected()
        return await conn.send(packed, timeout_s)

    async def execute_many(self, commands: list[bytes], timeout_s: float = 0.0) -> list[Any]:
        """Send several packed commands in one write; their replies, or the first error."""
        conn = self._conn
        if conn is None or conn.lost:
            conn = await self._connected()
        return await _all([conn.send(packed, timeout_s) for packed in commands])

    async def aclose(self) -> None:
        """Close the connection; a later call would open a new one."""
        if self._connecting is not None:
            self._connecting.cancel()
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.transport.close()
            await asyncio.wait([conn.closed], timeout=1.0)

    async def _connected(self) -> _Connection:
        """Callers arriving during a connect share it; one caller's cancellation does not
        cancel it for the others (it has its own timeout)."""
        task = self._connecting
        if task is None:
            task = self._connecting = asyncio.get_running_loop().create_task(self._connect())
            task.add_done_callback(self._connect_done)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # `aclose` cancelled the connect, not this caller: a failure, as for a lost link.
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise ConnectionError("redis link closed while connecting") from None
            raise

    def _connect_done(self, task: asyncio.Task[_Connection]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self._conn = task.result()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.path is not None:
                    _, conn = await loop.create_unix_connection(
                        lambda: _Connection(loop, self.hang_s), self.path)
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop, self.hang_s), self.host, self.port,
                        ssl=self.ssl_context,
                        server_hostname=self.host if self.ssl_context else None,
                    )
                # Before any queued command: the link is published only once this is done.
                handshake = []
                if self.password is not None:
                    user = () if self.username is None else (self.username.encode(),)
                    handshake.append(pack(b"AUTH", *user, self.password.encode()))
                if self.db:
                    handshake.append(pack(b"SELECT", str(self.db).encode()))
                await _all([conn.send(packed) for packed in handshake])
        except BaseException as exc:
            if conn is not None:
                conn._fail(ConnectionError("redis connect abandoned"))
            if isinstance(exc, ReplyError):  # wrong password, no such database
                raise ConnectionError(f"redis handshake failed: {exc}") from exc
            raise
        return conn


async def _all(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """The results in order, or the first error; after an error or a cancellation the rest
    are abandoned (their replies will be dropped), without "exception never retrieved"."""
    try:
        return [await future for future in futures]
    finally:
        for future in futures:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()
