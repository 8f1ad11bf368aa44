"""The access log's sink: JSON lines, written once per event-loop turn, the level switch, and
handlers a process adds itself."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from gateway import observability
from gateway.observability import JsonFormatter, access_log, flush_access_log, log_access


class Stream(io.BytesIO):
    """Remembers each write, to tell one write per turn from one per line."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: object) -> int:
        assert isinstance(data, bytes)
        self.writes.append(data)
        return super().write(data)

    def docs(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in self.getvalue().splitlines()]


@pytest.fixture
def fresh_logger() -> Iterator[None]:
    """The access logger is process-wide: other tests' gateways set it up on stderr."""
    saved = (access_log.handlers[:], access_log.level, access_log.propagate, observability._sink)
    access_log.handlers.clear()
    access_log.propagate = True  # as a logger no one set up is
    observability._sink = None
    yield
    flush_access_log()
    access_log.handlers[:], level, access_log.propagate, observability._sink = saved
    access_log.setLevel(level)


@pytest.fixture
def stream(fresh_logger: None) -> Stream:
    stream = Stream()
    observability.setup_access_log(stream=stream)
    return stream


def sink_only() -> None:
    """pytest attaches its capture handlers to non-propagating loggers for each test phase;
    without them the line takes the gateway's path, with no LogRecord."""
    sink = observability._sink
    assert sink is not None
    access_log.handlers[:] = [sink]


async def test_a_turns_lines_are_one_write_after_the_turn(stream: Stream) -> None:
    sink_only()
    log_access({"request_id": "a", "status": 200})
    log_access({"request_id": "b", "status": 429, "tenant_id": None})
    assert stream.writes == []  # held until the loop turns
    await asyncio.sleep(0)
    assert len(stream.writes) == 1
    docs = stream.docs()
    assert [d["request_id"] for d in docs] == ["a", "b"]
    assert docs[1]["status"] == 429 and docs[1]["tenant_id"] is None
    assert all(isinstance(d["ts"], float) for d in docs)
    log_access({"request_id": "c"})
    await asyncio.sleep(0)
    assert len(stream.writes) == 2 and stream.docs()[2]["request_id"] == "c"


def test_outside_a_loop_a_line_is_written_at_once(stream: Stream) -> None:
    sink_only()
    log_access({"request_id": "sync"})
    assert [d["request_id"] for d in stream.docs()] == ["sync"]


async def test_flush_writes_what_is_held(stream: Stream) -> None:
    sink_only()
    log_access({"request_id": "last"})
    flush_access_log()
    assert [d["request_id"] for d in stream.docs()] == ["last"]
    await asyncio.sleep(0)
    assert len(stream.writes) == 1  # the queued flush found nothing more


def test_a_loop_that_closed_before_its_flush_does_not_strand_later_lines(
    stream: Stream,
) -> None:
    sink_only()

    def first() -> None:
        log_access({"request_id": "first"})
        dead.stop()  # the loop stops before the turn that would flush

    dead = asyncio.new_event_loop()
    dead.call_soon(first)
    dead.run_forever()
    dead.close()
    assert stream.writes == []

    async def next_loop() -> None:
        log_access({"request_id": "second"})
        await asyncio.sleep(0)

    asyncio.run(next_loop())
    assert [d["request_id"] for d in stream.docs()] == ["first", "second"]


async def test_the_level_switches_it_off(stream: Stream) -> None:
    access_log.setLevel(logging.WARNING)
    log_access({"request_id": "quiet"})
    flush_access_log()
    assert stream.getvalue() == b""


async def test_a_handler_added_later_gets_records_and_the_sink_still_writes(
    stream: Stream,
) -> None:
    seen: list[dict[str, object]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(orjson.loads(JsonFormatter().format(record)))

    sink_only()
    capture = Capture()
    access_log.addHandler(capture)
    try:
        log_access({"request_id": "both"})
    finally:
        access_log.removeHandler(capture)
    await asyncio.sleep(0)
    assert [d["request_id"] for d in seen] == ["both"]
    assert stream.docs() == seen


def test_a_handler_the_process_configured_first_is_kept(fresh_logger: None) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    access_log.addHandler(handler)
    observability.setup_access_log(stream=Stream())
    assert observability._sink is None and handler in access_log.handlers
    log_access({"request_id": "mine", "status": 200})
    doc = orjson.loads(out.getvalue())
    assert doc["request_id"] == "mine" and doc["status"] == 200


def test_other_records_on_the_sink_are_json_too(stream: Stream) -> None:
    access_log.warning("odd %s", "thing")
    (doc,) = stream.docs()
    assert doc["msg"] == "odd thing" and doc["level"] == "warning"
    assert doc["logger"] == "tollway.access"
