"""RedisLink against real redis-servers: pipelined replies matched to their callers, abandoned
calls that do not poison the connection, a hung or dead server, reconnects, error replies,
AUTH + SELECT and the unix socket."""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import uvloop
from test_admission import Server

from gateway.redis_link import RedisLink, ReplyError, pack


@pytest.fixture
async def link(redis_url: str) -> AsyncIterator[RedisLink]:
    link = RedisLink.from_url(redis_url, connect_timeout_s=2.0)
    yield link
    await link.aclose()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.start()
    yield srv
    srv.stop()


async def client_id(link: RedisLink) -> int:
    return int(await link.execute(pack(b"CLIENT", b"ID")))


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(
    link: RedisLink,
) -> None:
    async def call(i: int) -> tuple[int, bool, int]:
        # Replies of different types and sizes (some span several socket reads).
        value = str(i).encode() * (1 + i % 7) * (1000 if i % 50 == 0 else 1)
        echoed = await link.execute(pack(b"ECHO", value))
        counted = await link.execute(pack(b"INCRBY", b"n:%d" % (i % 5), b"%d" % i))
        return i, echoed == value, counted

    # The first calls race the lazy connect: they must share it.
    ids, results = await asyncio.gather(
        asyncio.gather(*(client_id(link) for _ in range(20))),
        asyncio.gather(*(call(i) for i in range(2000))),
    )
    assert len(set(ids)) == 1
    assert all(ok for _, ok, _ in results)
    # Each INCRBY saw its own reply: the last value per counter is the sum of its increments.
    finals = {i % 5: 0 for i in range(2000)}
    for i in range(2000):
        finals[i % 5] += i
    got = await link.execute_many([pack(b"GET", b"n:%d" % k) for k in range(5)])
    assert [int(v) for v in got] == [finals[k] for k in range(5)]
    assert max(counted for i, _, counted in results if i % 5 == 0) == finals[0]
    assert await client_id(link) == ids[0]


async def test_an_abandoned_call_does_not_poison_the_connection(link: RedisLink) -> None:
    before = await client_id(link)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await link.execute(pack(b"BLPOP", b"nothing", b"0.3"))  # answers nil at 0.3 s
    # Queued behind the blocked command: gets its own reply, not BLPOP's late nil.
    assert await link.execute(pack(b"ECHO", b"next")) == b"next"
    assert await client_id(link) == before


async def test_a_server_that_stops_answering_is_dropped_after_the_hang_bound(
    redis_url: str,
) -> None:
    link = RedisLink.from_url(redis_url, hang_s=0.2)
    try:
        before = await client_id(link)
        blocked = asyncio.ensure_future(link.execute(pack(b"BLPOP", b"nothing", b"5")))
        queued = asyncio.ensure_future(link.execute(pack(b"ECHO", b"queued")))
        for call in (blocked, queued):
            with pytest.raises(ConnectionError, match="no reply"):
                await asyncio.wait_for(call, 2)
        assert await client_id(link) != before  # reconnected
    finally:
        await link.aclose()


async def test_error_replies_raise_and_recognise_noscript(link: RedisLink) -> None:
    with pytest.raises(ReplyError) as missing:
        await link.execute(pack(b"EVALSHA", b"0" * 40, b"0"))
    assert missing.value.noscript and str(missing.value).startswith("NOSCRIPT")
    await link.execute(pack(b"SET", b"s", b"x"))
    with pytest.raises(ReplyError) as wrong:
        await link.execute(pack(b"INCR", b"s"))
    assert not wrong.value.noscript
    with pytest.raises(ReplyError):
        await link.execute_many([pack(b"INCR", b"c"), pack(b"INCR", b"s"), pack(b"INCR", b"c")])
    assert await link.execute(pack(b"GET", b"c")) == b"2"  # the batch ran whole


async def test_killed_server_fails_pending_calls_and_a_restart_reconnects(server: Server) -> None:
    link = RedisLink.from_url(server.url, connect_timeout_s=1.0)
    try:
        assert await link.execute(pack(b"PING")) == b"PONG"
        pending = asyncio.ensure_future(link.execute(pack(b"BLPOP", b"nothing", b"10")))
        await asyncio.sleep(0.05)
        server.stop()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(pending, 2)
        with pytest.raises(OSError):  # refused: nothing listens
            await link.execute(pack(b"PING"))
        server.start()
        assert await link.execute(pack(b"PING")) == b"PONG"
    finally:
        await link.aclose()


async def test_unreachable_server_raises_oserror() -> None:
    link = RedisLink.from_url("redis://127.0.0.1:1/0", connect_timeout_s=0.5)
    with pytest.raises(OSError):
        await link.execute(pack(b"PING"))
    await link.aclose()


async def test_a_caller_cancelled_during_connect_leaves_it_to_the_others(server: Server) -> None:
    link = RedisLink.from_url(server.url, connect_timeout_s=1.0)
    try:
        impatient = asyncio.ensure_future(link.execute(pack(b"ECHO", b"a")))
        patient = asyncio.ensure_future(link.execute(pack(b"ECHO", b"b")))
        await asyncio.sleep(0)  # both are waiting on the one connect
        impatient.cancel()
        assert await patient == b"b"
        assert impatient.cancelled()
    finally:
        await link.aclose()


async def test_auth_and_select_before_any_command() -> None:
    srv = Server("--requirepass", "s3cret")
    srv.start()
    try:
        for url in (
            f"redis://:s3cret@127.0.0.1:{srv.port}/5",
            f"redis://default:s3cret@127.0.0.1:{srv.port}/5",
        ):
            link = RedisLink.from_url(url)
            try:
                # Queued before the connection exists: must run after AUTH and SELECT.
                await asyncio.gather(*(link.execute(pack(b"INCR", b"x")) for _ in range(3)))
            finally:
                await link.aclose()
        with redis.Redis(port=srv.port, password="s3cret", db=5) as check:
            assert check.get("x") == b"6"
        with redis.Redis(port=srv.port, password="s3cret", db=0) as check:
            assert check.get("x") is None
        wrong = RedisLink.from_url(f"redis://:nope@127.0.0.1:{srv.port}/0")
        with pytest.raises(ConnectionError, match="handshake"):
            await wrong.execute(pack(b"PING"))
        await wrong.aclose()
    finally:
        srv.stop()


async def test_unix_socket_with_a_database(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    srv = Server("--unixsocket", str(path), "--unixsocketperm", "700")
    srv.start()
    link = RedisLink.from_url(f"unix://{path}?db=3")
    try:
        await link.execute(pack(b"SET", b"u", b"1"))
        assert b" db=3 " in await link.execute(pack(b"CLIENT", b"INFO"))
        with redis.Redis(unix_socket_path=str(path), db=3) as check:
            assert check.get("u") == b"1"
    finally:
        await link.aclose()
        srv.stop()


def test_under_uvloop(server: Server) -> None:
    """The gateway's server runs uvloop: its transports must behave the same."""

    async def scenario() -> None:
        link = RedisLink.from_url(server.url, connect_timeout_s=1.0)
        try:
            echoed = await asyncio.gather(
                *(link.execute(pack(b"ECHO", b"%d" % i)) for i in range(500)))
            assert echoed == [b"%d" % i for i in range(500)]
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await link.execute(pack(b"BLPOP", b"nothing", b"0.2"))
            assert await link.execute(pack(b"ECHO", b"next")) == b"next"
            hung = RedisLink.from_url(server.url, hang_s=0.2)
            with pytest.raises(ConnectionError, match="no reply"):
                await asyncio.wait_for(hung.execute(pack(b"BLPOP", b"nothing", b"5")), 2)
            assert await hung.execute(pack(b"PING")) == b"PONG"
            await hung.aclose()
            pending = asyncio.ensure_future(link.execute(pack(b"BLPOP", b"nothing", b"10")))
            await asyncio.sleep(0.05)
            server.stop()
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(pending, 2)
            server.start()
            assert await link.execute(pack(b"PING")) == b"PONG"
        finally:
            await link.aclose()

    uvloop.run(scenario())


async def test_closing_during_a_connect_fails_its_callers_with_connectionerror(
    server: Server,
) -> None:
    link = RedisLink.from_url(server.url, connect_timeout_s=1.0)
    waiting = asyncio.ensure_future(link.execute(pack(b"PING")))
    await asyncio.sleep(0)  # the connect has started
    await link.aclose()
    with pytest.raises(ConnectionError, match="closed"):
        await waiting
    assert await link.execute(pack(b"PING")) == b"PONG"  # usable again: it reconnects
    await link.aclose()


def _wait_for_unread_reply(conn: Any) -> None:
    """Block (the loop with it) until the reply is in the socket: a shared Redis under the
    whole suite can take longer than any fixed sleep."""
    give_up = time.monotonic() + 10
    while not conn._unread():
        assert time.monotonic() < give_up, "redis did not answer within 10 s"
        time.sleep(0.002)


async def _deadline_scenario(url: str) -> None:
    """The reply deadline: a reply that does not come fails its call with TimeoutError, and
    the connection stays usable; a reply that came on time but was left unread because the
    event loop was stalled does not."""
    link = RedisLink.from_url(url, connect_timeout_s=1.0)
    try:
        before = await client_id(link)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                link.execute(pack(b"BLPOP", b"nothing", b"0.3"), timeout_s=0.05), 2)
        assert await link.execute(pack(b"ECHO", b"next"), timeout_s=5.0) == b"next"
        assert await client_id(link) == before

        # The reply came on time, but the process was stalled (descheduled on a busy box)
        # and has not read it when the deadline is checked: not a timeout. The timer's
        # callback is called by hand here because which comes first after a stall, the
        # socket read or the timers, depends on the loop and on where the stall fell.
        conn = link._conn
        assert conn is not None
        call = conn.send(pack(b"ECHO", b"late"), 0.01)
        conn._flush()
        time.sleep(0.05)  # five deadlines
        _wait_for_unread_reply(conn)
        conn._check_deadlines()
        assert not call.done()
        assert await call == b"late"
        # Whereas with nothing in the socket, the same check fails the call.
        blocked = conn.send(pack(b"BLPOP", b"nothing", b"0.3"), 0.01)
        conn._flush()
        time.sleep(0.05)
        conn._check_deadlines()
        with pytest.raises(TimeoutError):
            await blocked
        assert await link.execute(pack(b"ECHO", b"still"), timeout_s=5.0) == b"still"
    finally:
        await link.aclose()


async def test_the_reply_deadline_times_out_redis_not_the_event_loop(redis_url: str) -> None:
    await _deadline_scenario(redis_url)


async def test_the_reply_deadline_with_descriptors_past_select_range(redis_url: str) -> None:
    """A busy gateway holds thousands of client sockets: the link's socket then has a number
    select() cannot take. The unread-reply check must still see the reply."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the descriptor limit ({hard}) is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        await _deadline_scenario(redis_url)
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_reply_deadline_under_uvloop(server: Server) -> None:
    """The gateway's loop: its transports expose the socket the same way."""
    uvloop.run(_deadline_scenario(server.url))
