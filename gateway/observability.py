"""Metrics and the access log of the proxied hot path.

Metrics live on prometheus_client's default registry, which /metrics already serves. Label
values are bounded: status as a class (`2xx`...), and the tenant only for an allow-list fixed
per snapshot (`TenantLabels`); everyone else is `other`, and a request refused before its
tenant is known is `none`. Per-tenant series for every tenant would grow with the customer
base and take Prometheus down with it.

The per-request families are plain counts and bucket lists (`LoopCounter`, `LoopHistogram`)
rendered at scrape time as prometheus_client's Counter and Histogram would render them:
prometheus_client takes a lock and walks the buckets in Python on every update, which made
the metrics a twentieth of a request's CPU; a process here runs one event loop and needs
neither.

Metrics other modules already export are not repeated here: the snapshot age
(`tollway_snapshot_age_seconds`, snapshot_refresher), the spool size and usage counters
(usage_emitter), degraded admissions and Redis failures (admission), tenant mismatches
(resolution).

The access log is one JSON line per request on the `tollway.access` logger: the gateway
builds one dict and it becomes one `orjson.dumps`. By default the lines skip the logging
machinery (a LogRecord, the handler lock, a formatter, a write and flush per line cost more than
the rest of the request's observability): `AccessSink` buffers them and writes each event-loop
turn's lines to stderr in one write. A handler the process added itself gets LogRecords as
before. The logger's level is still the switch.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from bisect import bisect_left
from collections.abc import Mapping
from typing import BinaryIO

import orjson
from prometheus_client import REGISTRY, Counter, Metric
from prometheus_client.utils import floatToGoString

from gateway.admission import Decision
from gateway.snapshot import Snapshot

METRICS_TENANTS = 100  # tenants with their own label value; the rest share "other"
METRICS_FLAG = "metrics_label"  # tenant settings.features flag that claims a label first
OTHER = "other"
NO_TENANT = "none"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_REDIS_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class Count:
    """One counter series: its value and when it was first seen (the `_created` sample)."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()


class Buckets:
    """One histogram series. Each observation bumps only its own bucket, found by bisection;
    the cumulative counts Prometheus wants are summed at scrape time, which is rare."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # `le`: a value on a bound counts
        self.sum += value


class LoopCounter:
    """A labelled counter without prometheus_client's per-update lock, registered on the
    default registry as a collector that renders what a `Counter` of the same name, help and
    labels would (`_total` and `_created` per series, in first-seen order).

    No lock because the gateway is single-threaded per process: one asyncio loop, on which
    the /metrics endpoint also renders, so a scrape never interleaves with an update.
    `_labelnames` has prometheus_client's attribute name: tests/test_deploy.py reads it to
    check the rules and dashboards against the labels the code exports."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self._labelnames = labelnames
        self.series: dict[tuple[str, ...], Count] = {}
        REGISTRY.register(self)

    def child(self, *labels: str) -> Count:
        found = self.series.get(labels)
        if found is None:
            found = self.series[labels] = Count()
        return found

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, "counter")]

    def collect(self) -> list[Metric]:
        family = Metric(self.name, self.documentation, "counter")
        for key, count in list(self.series.items()):
            labels = dict(zip(self._labelnames, key, strict=True))
            family.add_sample(self.name + "_total", labels, float(count.value))
            family.add_sample(self.name + "_created", labels, count.created)
        return [family]


class LoopHistogram:
    """A histogram without prometheus_client's per-observation lock and Python bucket loop,
    rendered as a `Histogram` of the same name, help, labels and buckets would be: cumulative
    `_bucket` samples up to `+Inf`, then `_count`, `_sum` and `_created` per series. An
    unlabelled one is exported (all zeros) from the start, as prometheus_client does.

    Single-threaded like LoopCounter, for the same reason; `_labelnames` likewise."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self._labelnames = labelnames
        self.bounds = buckets
        # prometheus_client's own `le` formatting, so the label values match exactly
        self._les = [floatToGoString(b) for b in buckets] + ["+Inf"]  # type: ignore[no-untyped-call]
        self.series: dict[tuple[str, ...], Buckets] = {}
        if not labelnames:
            self.series[()] = Buckets(buckets)
        REGISTRY.register(self)

    def child(self, *labels: str) -> Buckets:
        found = self.series.get(labels)
        if found is None:
            found = self.series[labels] = Buckets(self.bounds)
        return found

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, "histogram")]

    def collect(self) -> list[Metric]:
        family = Metric(self.name, self.documentation, "histogram")
        for key, series in list(self.series.items()):
            labels = dict(zip(self._labelnames, key, strict=True))
            total = 0
            for le, n in zip(self._les, series.counts, strict=True):
                total += n
                family.add_sample(self.name + "_bucket", {**labels, "le": le}, float(total))
            family.add_sample(self.name + "_count", labels, float(total))
            family.add_sample(self.name + "_sum", labels, series.sum)
            family.add_sample(self.name + "_created", labels, series.created)
        return [family]


REQUESTS = LoopCounter(
    "tollway_gateway_requests",
    "Proxied-path requests answered, by status class and (bounded) tenant",
    ("status_class", "tenant"),
)
LATENCY = LoopHistogram(
    "tollway_gateway_request_seconds",
    "Time from the request's arrival to its last response byte, by status class and tenant",
    ("status_class", "tenant"),
    _LATENCY_BUCKETS,
)
OVERHEAD = LoopHistogram(
    "tollway_gateway_overhead_seconds",
    "The gateway's own share of a proxied request: total time minus the upstream's time",
    (),
    _OVERHEAD_BUCKETS,
)
ADMISSIONS = LoopCounter(
    "tollway_gateway_admission_decisions",
    "Admission outcomes: allowed, limited (429) or unavailable (503), by violated policy and "
    "whether Redis was consulted",
    ("outcome", "policy", "degraded"),
)
ADMISSION_SECONDS = LoopHistogram(
    "tollway_gateway_admission_seconds",
    "Time of the admission call: the Redis round trip, or the local decision without it",
    (),
    _REDIS_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "tollway_gateway_upstream_errors",
    "Upstream failures: connect (502 before a response), timeout (504), cut (response broken "
    "off mid-body)",
    ["kind"],
)
_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")


def status_class(status: int) -> str:
    return _CLASSES[status // 100] if 0 < status < 600 else "5xx"


class TenantLabels:
    """The tenants that get their own label value, chosen once per snapshot: those whose
    settings set `features.metrics_label`, then the rest in id order, up to METRICS_TENANTS.
    The label is the tenant id (names change and collide; ids do not)."""

    __slots__ = ("_labelled", "limit")

    def __init__(self, limit: int = METRICS_TENANTS) -> None:
        self.limit = limit
        self._labelled: frozenset[str] = frozenset()

    def update(self, snapshot: Snapshot) -> None:
        ranked = sorted(snapshot.tenants.values(), key=lambda t: (not _flagged(t.settings), t.id))
        self._labelled = frozenset(t.id for t in ranked[: self.limit])

    def label(self, tenant_id: str | None) -> str:
        if tenant_id is None:
            return NO_TENANT
        return tenant_id if tenant_id in self._labelled else OTHER


def _flagged(settings: Mapping[str, object]) -> bool:
    features = settings.get("features")
    return isinstance(features, dict) and features.get(METRICS_FLAG) is True


class RequestMetrics:
    """Records one request into the Loop* metrics above; each label combination's series are
    looked up once and kept, so a request costs one dict lookup and a few additions."""

    __slots__ = ("_admission_seconds", "_admissions", "_children", "_overhead")

    def __init__(self) -> None:
        self._children: dict[tuple[str, str], tuple[Count, Buckets]] = {}
        self._admissions: dict[tuple[str, str, bool], Count] = {}
        self._overhead = OVERHEAD.child()
        self._admission_seconds = ADMISSION_SECONDS.child()

    def request(self, status: int, tenant_label: str, seconds: float,
                upstream_s: float | None) -> None:
        key = (status_class(status), tenant_label)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (REQUESTS.child(*key), LATENCY.child(*key))
        children[0].value += 1
        children[1].observe(seconds)
        if upstream_s is not None:
            self._overhead.observe(max(0.0, seconds - upstream_s))

    def admission(self, decision: Decision, seconds: float) -> None:
        self._admission_seconds.observe(seconds)
        key = (
            "allowed" if decision.allowed else ("limited" if decision.status == 429
                                                else "unavailable"),
            decision.violated or "",
            decision.degraded,
        )
        count = self._admissions.get(key)
        if count is None:
            count = self._admissions[key] = ADMISSIONS.child(key[0], key[1],
                                                             "true" if key[2] else "false")
        count.value += 1


def upstream_error(kind: str) -> None:
    UPSTREAM_ERRORS.labels(kind).inc()


class JsonFormatter(logging.Formatter):
    """One JSON object per line. A record whose message is a dict (the access log) is dumped
    as is; any other record becomes {ts, level, logger, msg[, exc]}."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, dict) and not record.args:
            return orjson.dumps(record.msg).decode()
        doc: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


_ACCESS = "tollway.access"
access_log = logging.getLogger(_ACCESS)


class AccessSink(logging.Handler):
    """JSON lines held in memory and written once per event-loop turn: one write and flush
    for all the requests that finished in that turn instead of one per request. Outside a
    running loop a line is written at once. The lines of the turn a process dies in are lost
    (at most one turn's worth); `logging.shutdown` flushes at a normal exit.

    It assumes one event loop per process, as granian's workers have. A flush is pending on
    at most one loop; a line from another loop (a new one, after the old one closed with its
    flush still queued) schedules a flush there, so no line waits for a loop that is gone."""

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__()
        self.stream = stream
        self._lines: list[bytes] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None

    def write(self, line: bytes) -> None:
        self._lines.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_on is not loop:
            self._flush_on = loop
            loop.call_soon(self.flush)

    def emit(self, record: logging.LogRecord) -> None:
        """The logging path, taken when the process added handlers of its own."""
        if isinstance(record.msg, dict) and not record.args:
            self.write(orjson.dumps(record.msg, option=orjson.OPT_APPEND_NEWLINE))
        else:
            self.write(self.format(record).encode() + b"\n")

    def flush(self) -> None:
        self._flush_on = None
        lines = self._lines
        if lines:
            self._lines = []
            self.stream.write(b"".join(lines))
            self.stream.flush()


_sink: AccessSink | None = None


def setup_access_log(level: int = logging.INFO, stream: BinaryIO | None = None) -> None:
    """INFO as JSON lines on `stream` (stderr by default), unless the process already gave the
    logger a handler: then that handler gets the lines, as LogRecords."""
    global _sink
    if not access_log.handlers:
        _sink = AccessSink(sys.stderr.buffer if stream is None else stream)
        _sink.setFormatter(JsonFormatter())
        access_log.addHandler(_sink)
        access_log.propagate = False
    access_log.setLevel(level)


def log_access(doc: dict[str, object]) -> None:
    """When the sink is the logger's only handler the line goes straight to it; otherwise a
    record is made and handled directly (`Logger.info` would also walk the stack to find the
    caller, which the access log has no use for)."""
    if access_log.isEnabledFor(logging.INFO):
        doc["ts"] = round(time.time(), 3)
        handlers = access_log.handlers
        if len(handlers) == 1 and handlers[0] is _sink:
            _sink.write(orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE))
        else:
            access_log.handle(access_log.makeRecord(_ACCESS, logging.INFO, "", 0, doc, (), None))


def flush_access_log() -> None:
    """Write the buffered access lines now: the gateway's shutdown calls it after the last
    request, so a stop loses nothing even if the loop is not run again."""
    if _sink is not None:
        _sink.flush()
