"""The access log's sink: JSON lines, written once per event-loop turn, the level switch, and
handlers a process adds itself; the request metrics and their exposition."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterable, Iterator

import orjson
import pytest
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    Metric,
    generate_latest,
)

from gateway import observability
from gateway.admission import Decision, Policy
from gateway.observability import (
    JsonFormatter,
    LoopCounter,
    LoopHistogram,
    RequestMetrics,
    access_log,
    flush_access_log,
    log_access,
    status_class,
)


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


# --- metrics ------------------------------------------------------------------------------
# The gateway's families are the lock-free Loop* collectors; they must render exactly what
# prometheus_client's Counter and Histogram did, since the rules and dashboards read them.

ALLOWED = Decision(True, 200, None, 0, Policy.__new__(Policy))
LIMITED = Decision(False, 429, "expo_rpm", 7, Policy.__new__(Policy))
UNAVAILABLE = Decision(False, 503, "expo_down", 0, Policy.__new__(Policy), degraded=True)
# (status, tenant label, seconds, upstream seconds); bounds hit exactly, +Inf and a negative
# overhead (upstream longer than the total) included
REQUESTS = [
    (200, "t_expo_a", 0.001, 0.0004), (204, "t_expo_a", 0.0012, None),
    (200, "t_expo_a", 0.3, 0.22), (429, "t_expo_b", 0.0, None), (503, "t_expo_b", 31.0, 30.5),
    (101, "t_expo_b", 0.5, 0.6), (700, "t_expo_a", 2.0, 1.998),
]
ADMISSIONS = [(ALLOWED, 0.00025), (ALLOWED, 0.0003), (LIMITED, 0.2), (UNAVAILABLE, 1.0)]


def record(metrics: RequestMetrics) -> None:
    for status, tenant, seconds, upstream_s in REQUESTS:
        metrics.request(status, tenant, seconds, upstream_s)
    for decision, seconds in ADMISSIONS:
        metrics.admission(decision, seconds)


def values(families: Iterable[Metric]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample but `_created`, whose value is a clock reading."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in families for s in f.samples if not s.name.endswith("_created")}


def test_the_exposition_has_exact_buckets_counts_and_sums() -> None:
    unlabelled = values([*observability.OVERHEAD.collect(),
                         *observability.ADMISSION_SECONDS.collect()])
    record(RequestMetrics())
    lines = set(generate_latest(REGISTRY).decode().splitlines())
    latency = "tollway_gateway_request_seconds"
    a2 = 'status_class="2xx",tenant="t_expo_a"'
    cumulative_a2 = [1, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3]  # 0.001, 0.0012, 0.3
    les = ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0",
           "2.5", "5.0", "10.0", "30.0", "+Inf"]
    for le, n in zip(les, cumulative_a2, strict=True):
        assert f'{latency}_bucket{{le="{le}",{a2}}} {float(n)}' in lines
    assert f"{latency}_count{{{a2}}} 3.0" in lines
    assert f"{latency}_sum{{{a2}}} {0.001 + 0.0012 + 0.3}" in lines
    b5 = 'status_class="5xx",tenant="t_expo_b"'
    assert f'{latency}_bucket{{le="30.0",{b5}}} 0.0' in lines  # 31 s: only +Inf
    assert f'{latency}_bucket{{le="+Inf",{b5}}} 1.0' in lines
    assert f"{latency}_sum{{{b5}}} 31.0" in lines
    a5 = 'status_class="5xx",tenant="t_expo_a"'  # status 700 counts as 5xx
    assert f'{latency}_bucket{{le="1.0",{a5}}} 0.0' in lines
    assert f'{latency}_bucket{{le="2.5",{a5}}} 1.0' in lines
    assert f'tollway_gateway_requests_total{{{a2}}} 3.0' in lines
    assert f'tollway_gateway_requests_total{{{b5}}} 1.0' in lines
    assert 'tollway_gateway_requests_total{status_class="1xx",tenant="t_expo_b"} 1.0' in lines
    assert any(line.startswith(f"tollway_gateway_requests_created{{{a2}}} ") for line in lines)
    assert ('tollway_gateway_admission_decisions_total'
            '{degraded="false",outcome="limited",policy="expo_rpm"} 1.0') in lines
    assert ('tollway_gateway_admission_decisions_total'
            '{degraded="true",outcome="unavailable",policy="expo_down"} 1.0') in lines
    # the unlabelled histograms are shared with the rest of the process: compare growth
    grown = values([*observability.OVERHEAD.collect(),
                    *observability.ADMISSION_SECONDS.collect()])
    delta = {k: v - unlabelled[k] for k, v in grown.items()}

    def bucket(name: str, le: str) -> float:
        return delta[(f"{name}_bucket", frozenset({("le", le)}))]

    overhead = "tollway_gateway_overhead_seconds"  # 0.0006, 0.08, 0.5, 0.0 (clamped), 0.002
    assert [bucket(overhead, le) for le in ("0.0001", "0.001", "0.0025", "0.1", "+Inf")] == [
        1.0, 2.0, 3.0, 4.0, 5.0]
    assert delta[(f"{overhead}_count", frozenset())] == 5.0
    assert delta[(f"{overhead}_sum", frozenset())] == pytest.approx(0.5826)
    admission = "tollway_gateway_admission_seconds"  # 0.00025, 0.0003, 0.2, 1.0
    assert [bucket(admission, le) for le in ("0.00025", "0.0005", "0.1", "0.25", "+Inf")] == [
        1.0, 2.0, 2.0, 3.0, 4.0]
    assert delta[(f"{admission}_sum", frozenset())] == pytest.approx(1.20055)


def test_the_families_are_what_prometheus_client_would_render() -> None:
    """The same observations into prometheus_client's own metrics, defined as the rules and
    dashboards know them, give the same samples, names, types and help."""
    ref = CollectorRegistry()
    requests = Counter("tollway_gateway_requests",
                       "Proxied-path requests answered, by status class and (bounded) tenant",
                       ["status_class", "tenant"], registry=ref)
    latency = Histogram(
        "tollway_gateway_request_seconds",
        "Time from the request's arrival to its last response byte, by status class and tenant",
        ["status_class", "tenant"], registry=ref,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                 30.0))
    overhead = Histogram(
        "tollway_gateway_overhead_seconds",
        "The gateway's own share of a proxied request: total time minus the upstream's time",
        registry=ref,
        buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1))
    admissions = Counter(
        "tollway_gateway_admission_decisions",
        "Admission outcomes: allowed, limited (429) or unavailable (503), by violated policy "
        "and whether Redis was consulted", ["outcome", "policy", "degraded"], registry=ref)
    admission_seconds = Histogram(
        "tollway_gateway_admission_seconds",
        "Time of the admission call: the Redis round trip, or the local decision without it",
        registry=ref,
        buckets=(0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))
    for status, tenant, seconds, upstream_s in REQUESTS:
        requests.labels(status_class(status), tenant).inc()
        latency.labels(status_class(status), tenant).observe(seconds)
        if upstream_s is not None:
            overhead.observe(max(0.0, seconds - upstream_s))
    admissions.labels("allowed", "", "false").inc(2)
    admissions.labels("limited", "expo_rpm", "false").inc()
    admissions.labels("unavailable", "expo_down", "true").inc()
    for _, seconds in ADMISSIONS:
        admission_seconds.observe(seconds)

    ours: list[LoopCounter | LoopHistogram] = [
        observability.REQUESTS, observability.LATENCY, observability.OVERHEAD,
        observability.ADMISSIONS, observability.ADMISSION_SECONDS]
    before = [values(c.collect()) for c in ours]
    record(RequestMetrics())
    for collector, earlier, theirs in zip(ours, before, [requests, latency, overhead, admissions,
                                                         admission_seconds], strict=True):
        (mine,), (expected,) = collector.collect(), theirs.collect()
        assert (mine.name, mine.type, mine.documentation) == (
            expected.name, expected.type, expected.documentation)
        now = values([mine])
        grown = {k: v - earlier.get(k, 0.0) for k, v in now.items()}
        wanted = values([expected])
        assert {k: grown[k] for k in wanted} == pytest.approx(wanted)
        assert {s.name for s in mine.samples} == {s.name for s in expected.samples}
        # the order of labels within a sample, as prometheus_client builds them
        first = {s.name: list(s.labels) for s in expected.samples}
        assert {s.name: list(s.labels) for s in mine.samples} == first
