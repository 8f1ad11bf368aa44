"""Usage events from the shard streams into ClickHouse, each entry stored exactly once.

A batch is delivered and its id range recorded in one atomic step (read_batch.lua), inserted
with `insert_deduplication_token = "{stream}:{first}-{last}"`, then acknowledged together with
the deletion of its record (MULTI). Every pending entry therefore belongs to a recorded range,
and a redelivered entry is handled by rebuilding its whole range with XRANGE and inserting it
again under the same token: ClickHouse drops the repeated block. docs/usage-pipeline.md has
the full argument.

On chDB a batch reaches ClickHouse as its payloads joined by newlines, and ClickHouse decodes
it (insert_lines.sql): Python touches no event. A batch with any line not in the exact shape
UsageEvent.to_bytes writes is decoded here instead, under the same token.
"""

from __future__ import annotations

import functools
import logging
import re
import struct
import tempfile
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from clickhouse_connect.driver._chdbclient import ChdbClient
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import ResponseError

from metering.clickhouse import run_blocking
from metering.events import FIELD, InvalidEvent, UsageEvent, stream_key
from metering.schema import RAW_COLUMNS, RAW_TABLE, insert_settings

log = logging.getLogger("tollway.metering")

GROUP = "tollway-metering"
DLQ_STREAM = "{tollway:usage:dlq}"
SOURCE = "gateway"
READ_SCRIPT = (Path(__file__).parent / "read_batch.lua").read_text()

# The exact bytes UsageEvent.to_bytes (orjson) writes: keys in its order, no whitespace, strings
# without \u escapes or raw control characters, numbers in plain JSON form within the column
# ranges. orjson accepts every such line and reads the same values ClickHouse does, so a line
# that matches is stored the same by either path; anything else goes to the Python path.
_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt])'
_STR = rf'"{_CHAR}*"'
_UINT64 = r"(?:0|[1-9][0-9]{0,18})"
CANONICAL_EVENT = (
    r'^\{"event_id":"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"'
    rf',"tenant_id":"{_CHAR}+","meter":"{_CHAR}+","subject":{_STR}'
    r',"time":[1-9][0-9]{0,12}'
    r',"units":"-?(?:0|[1-9][0-9]{0,28})(?:\.[0-9]{1,9})?"'
    rf',"route":{_STR},"method":{_STR}'
    r',"status":(?:0|[1-9][0-9]{0,4})'
    r',"latency_ms":-?(?:0|[1-9][0-9]{0,15})(?:\.[0-9]{1,20})?(?:[eE][-+]?[0-9]{1,2})?'
    rf',"bytes_in":{_UINT64},"bytes_out":{_UINT64}'
    rf',"dims":\{{(?:{_STR}:{_STR}(?:,{_STR}:{_STR})*)?\}}\}}$'
)


def _quote(text: str) -> str:
    """A ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


INSERT_LINES = (
    (Path(__file__).parent / "insert_lines.sql")
    .read_text()
    .replace("{shape}", _quote(CANONICAL_EVENT))
)

STORED = Counter("tollway_usage_events_stored", "Usage events inserted into ClickHouse")
DEAD_LETTERED = Counter("tollway_usage_events_dead_lettered", "Malformed usage events set aside")
BATCH_SIZE = Histogram(
    "tollway_usage_batch_entries",
    "Stream entries per consumed batch",
    buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000, 50000),
)
INSERT_SECONDS = Histogram(
    "tollway_usage_insert_seconds",
    "Time to insert one batch into ClickHouse",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
LAG = Gauge("tollway_usage_lag_entries", "Entries not yet delivered to the group", ["shard"])
PENDING = Gauge(
    "tollway_usage_pending_entries", "Entries delivered but not acknowledged", ["shard"]
)

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_MAX_UNITS = Decimal(10) ** 29
_MAX_TIME_MS = 10_000_000_000_000
_MAX_U64 = 2**64

Entry = tuple[bytes, Any]
DeadEntry = tuple[bytes, bytes, str]


def batches_key(stream: str) -> str:
    return f"{stream}:batches"


def _token(stream: str, ids: Sequence[bytes]) -> str:
    return f"{stream}:{ids[0].decode()}-{ids[-1].decode()}"


def _sid(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _payload(fields: Any) -> bytes | None:
    """The `e` field of an entry, as read by the script (flat list) or redis-py (dict)."""
    if isinstance(fields, dict):
        value = fields.get(FIELD)
        return value if isinstance(value, bytes) else None
    if fields and len(fields) >= 2 and fields[0] == FIELD:
        return bytes(fields[1])
    return None


def _row_problem(event: UsageEvent) -> str | None:
    """What UsageEvent accepts but the raw table's types cannot hold."""
    if not _UUID.fullmatch(event.event_id):
        return "event_id must be a UUID"
    if not 0 <= event.status <= 65535:
        return "status must fit UInt16"
    if not (0 <= event.bytes_in < _MAX_U64 and 0 <= event.bytes_out < _MAX_U64):
        return "bytes_in and bytes_out must fit UInt64"
    units = event.units
    if abs(units) >= _MAX_UNITS or int(units.as_tuple().exponent) < -9:
        return "units out of Decimal(38, 9) range or precision"
    if event.time_ms >= _MAX_TIME_MS:
        return "time out of range"
    try:
        struct.pack("<f", event.latency_ms)
    except OverflowError:
        return "latency_ms must fit Float32"  # else the whole batch would fail, forever
    return None


class UsageConsumer:
    def __init__(
        self,
        client: aioredis.Redis,
        clickhouse: Client,
        *,
        shards: int,
        name: str,
        batch: int,
        claim_idle_ms: int,
        decode_in_clickhouse: bool = True,
    ) -> None:
        self._redis = client
        self._clickhouse = clickhouse
        self._read_script = client.register_script(READ_SCRIPT)
        self.streams = [stream_key(shard) for shard in range(shards)]
        self.name = name
        self._batch = batch
        self._claim_idle_ms = claim_idle_ms
        # A ClickHouse server cannot read this process's files: it gets the Python path.
        self._decode_in_clickhouse = decode_in_clickhouse and isinstance(clickhouse, ChdbClient)

    async def setup(self) -> None:
        for stream in self.streams:
            try:
                await self._redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def poll(self) -> int:
        """Read one new batch from every shard and store them; returns entries handled."""
        pipe = self._redis.pipeline(transaction=False)
        for stream in self.streams:
            await self._read_script(
                keys=[stream, batches_key(stream)],
                args=[GROUP, self.name, self._batch],
                client=pipe,
            )
        replies = await pipe.execute()
        handled = 0
        for stream, reply in zip(self.streams, replies, strict=True):
            if reply:
                ids, payloads = reply
                if not await self._insert_lines(stream, ids, payloads):
                    await self._insert_entries(stream, await self._entries(stream, ids))
                await self.ack(stream, ids)
                handled += len(ids)
        return handled

    async def read(self, stream: str) -> list[Entry]:
        """Deliver and record one batch of `stream` to this consumer (the first step of poll)."""
        reply = await self._read_script(
            keys=[stream, batches_key(stream)], args=[GROUP, self.name, self._batch]
        )
        return await self._entries(stream, reply[0]) if reply else []

    async def _entries(self, stream: str, ids: Sequence[bytes]) -> list[Entry]:
        """A delivered batch's entries: the stream range it was recorded as."""
        entries: Any = await self._redis.xrange(stream, ids[0], ids[-1])
        # Pending but deleted from the stream by someone else: dead-letter the ids.
        return list(entries) or [(entry_id, None) for entry_id in ids]

    async def store(self, stream: str, entries: Sequence[Entry]) -> None:
        await self.insert(stream, entries)
        await self.ack(stream, [entry_id for entry_id, _ in entries])

    async def insert(self, stream: str, entries: Sequence[Entry]) -> None:
        """Insert a recorded batch under its range token; dead-letter what cannot be stored."""
        ids = [entry_id for entry_id, _ in entries]
        payloads = [_payload(fields) for _, fields in entries]
        whole = [payload for payload in payloads if payload is not None]
        if len(whole) < len(payloads) or not await self._insert_lines(stream, ids, whole):
            await self._insert_entries(stream, entries)

    async def ack(self, stream: str, ids: Sequence[bytes]) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.xack(stream, GROUP, *ids)
        pipe.hdel(batches_key(stream), ids[0])
        await pipe.execute()

    async def _insert_lines(
        self, stream: str, ids: Sequence[bytes], payloads: Sequence[bytes] | None
    ) -> bool:
        """The fast path: ClickHouse decodes the batch. False if it does not apply or a line was
        refused; a refused INSERT has written nothing, so the Python path reuses the token."""
        if not self._decode_in_clickhouse or not payloads:
            return False
        lines = b"\n".join(payloads)
        if lines.count(b"\n") != len(ids) - 1:
            return False  # a payload holds a newline: row i would not be entry i
        started = time.perf_counter()
        try:
            await run_blocking(self._insert_file, _token(stream, ids), lines)
        except DatabaseError as exc:
            log.info("%s batch %s: decoding in Python (%s)", stream, ids[0], exc)
            return False
        INSERT_SECONDS.observe(time.perf_counter() - started)
        BATCH_SIZE.observe(len(ids))
        STORED.inc(len(ids))
        return True

    def _insert_file(self, token: str, lines: bytes) -> None:
        """chDB reads the lines from a file, as there is no request body to stream them in. The
        file never has a name (O_TMPFILE), so a killed worker leaves nothing behind; chDB runs
        in this process and opens it as /dev/fd/N."""
        with tempfile.TemporaryFile() as file:
            file.write(lines)
            file.flush()
            file.seek(0)  # where /dev/fd/N shares this offset (macOS), not only on Linux
            path = f"/dev/fd/{file.fileno()}"
            sql = INSERT_LINES.replace("{path}", _quote(path)).replace("{token}", _quote(token))
            self._clickhouse.command(sql)

    async def _insert_entries(self, stream: str, entries: Sequence[Entry]) -> None:
        """The Python path: decode and check each entry, dead-letter the bad ones."""
        token = _token(stream, [entries[0][0], entries[-1][0]])
        columns, dead = self._columns(entries)
        BATCH_SIZE.observe(len(entries))
        if dead:
            await self._dead_letter(stream, dead)
        if columns[0]:
            started = time.perf_counter()
            await run_blocking(
                functools.partial(
                    self._clickhouse.insert,
                    RAW_TABLE,
                    columns,
                    column_names=RAW_COLUMNS,
                    column_oriented=True,
                    settings=insert_settings(token),
                )
            )
            INSERT_SECONDS.observe(time.perf_counter() - started)
            STORED.inc(len(columns[0]))

    def _columns(self, entries: Sequence[Entry]) -> tuple[list[list[Any]], list[DeadEntry]]:
        columns: list[list[Any]] = [[] for _ in RAW_COLUMNS]
        (
            c_id,
            c_tenant,
            c_meter,
            c_subject,
            c_time,
            c_units,
            c_route,
            c_method,
            c_status,
            c_latency,
            c_in,
            c_out,
            c_dims,
            c_source,
        ) = columns
        dead: list[DeadEntry] = []
        for entry_id, fields in entries:
            raw = _payload(fields)
            try:
                if raw is None:
                    raise InvalidEvent("entry has no 'e' field")
                event = UsageEvent.from_bytes(raw)
            except InvalidEvent as exc:
                dead.append((entry_id, raw or b"", str(exc)))
                continue
            problem = _row_problem(event)
            if problem is not None:
                dead.append((entry_id, raw, problem))
                continue
            c_id.append(event.event_id)
            c_tenant.append(event.tenant_id)
            c_meter.append(event.meter)
            c_subject.append(event.subject)
            c_time.append(event.time_ms)
            c_units.append(event.units)
            c_route.append(event.route)
            c_method.append(event.method)
            c_status.append(event.status)
            c_latency.append(event.latency_ms)
            c_in.append(event.bytes_in)
            c_out.append(event.bytes_out)
            c_dims.append(event.dims)
            c_source.append(SOURCE)
        return columns, dead

    async def _dead_letter(self, stream: str, dead: list[DeadEntry]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for entry_id, raw, reason in dead:
            pipe.xadd(DLQ_STREAM, {"stream": stream, "id": entry_id, "reason": reason, "e": raw})
        await pipe.execute()
        DEAD_LETTERED.inc(len(dead))
        log.warning("dead-lettered %d usage entries from %s", len(dead), stream)

    async def recover_own(self) -> int:
        """Store again the batches this consumer read but did not acknowledge."""
        handled = 0
        for stream in self.streams:
            while True:
                reply: Any = await self._redis.xreadgroup(
                    GROUP, self.name, {stream: "0"}, count=self._batch
                )
                ids = [entry_id for entry_id, _ in reply[0][1]] if reply else []
                if not ids:
                    break
                handled += await self._redeliver(stream, ids)
        return handled

    async def claim(self) -> int:
        """Take over entries idle longer than claim_idle_ms (their consumer died) and store them."""
        handled = 0
        for stream in self.streams:
            start: bytes | str = "0-0"
            while True:
                claim: Any = await self._redis.xautoclaim(
                    stream, GROUP, self.name, self._claim_idle_ms, start, count=self._batch
                )
                start, claimed = claim[0], claim[1]
                ids = [entry_id for entry_id, _ in claimed]
                if ids:
                    handled += await self._redeliver(stream, ids)
                if _sid(start) == (0, 0):
                    break
        return handled

    async def _redeliver(self, stream: str, ids: Sequence[bytes]) -> int:
        """Rebuild each recorded batch that holds one of `ids` and store it under its token."""
        records: Any = await self._redis.hgetall(batches_key(stream))
        ranges = [(_sid(first), _sid(last), first, last) for first, last in records.items()]
        wanted: dict[bytes, tuple[tuple[int, int], tuple[int, int], bytes, bytes]] = {}
        for entry_id in ids:
            sid = _sid(entry_id)
            hit = next((r for r in ranges if r[0] <= sid <= r[1]), None)
            if hit is None:
                # Never recorded, which read_batch.lua rules out; store it alone, not lose it.
                log.warning("pending entry %s of %s has no batch record", entry_id, stream)
                await self._redis.hset(batches_key(stream), entry_id, entry_id)
                hit = (sid, sid, entry_id, entry_id)
                ranges.append(hit)
            wanted[hit[2]] = hit
        handled = 0
        for lo, hi, first, last in sorted(wanted.values()):
            entries: Any = await self._redis.xrange(stream, first, last)
            if not entries:
                # Pending but deleted from the stream by someone else: dead-letter the ids.
                entries = [(i, None) for i in ids if lo <= _sid(i) <= hi]
            if entries:
                await self.store(stream, entries)
                handled += len(entries)
        return handled

    async def trim(self) -> None:
        """Drop acknowledged entries only: below both last-delivered-id and the oldest pending."""
        for stream in self.streams:
            groups = await self._redis.xinfo_groups(stream)
            group = next((g for g in groups if _name(g) == GROUP), None)
            if group is None:
                continue
            floor = group["last-delivered-id"]
            pending = await self._redis.xpending(stream, GROUP)
            if pending["pending"] and _sid(pending["min"]) < _sid(floor):
                floor = pending["min"]
            if _sid(floor) != (0, 0):
                await self._redis.xtrim(stream, minid=floor, approximate=False)

    async def observe_lag(self) -> None:
        for shard, stream in enumerate(self.streams):
            groups = await self._redis.xinfo_groups(stream)
            group = next((g for g in groups if _name(g) == GROUP), None)
            if group is None:
                continue
            lag = group.get("lag")
            if lag is None:
                # Redis 6.2 has no lag field: an upper bound, since trimming keeps the stream
                # close to pending + undelivered.
                lag = max(0, await self._redis.xlen(stream) - int(group["pending"]))
            LAG.labels(str(shard)).set(int(lag))
            PENDING.labels(str(shard)).set(int(group["pending"]))


def _name(group: dict[str, Any]) -> str:
    name = group["name"]
    return name.decode() if isinstance(name, bytes) else str(name)
