"""The usage event: the contract between the gateway (producer) and the metering pipeline.

Events travel through Redis Streams, one entry per event with the orjson document in field
`e`. Shards are tenant-affine so one tenant's events stay ordered in one stream, and each
shard key is its own hash tag so shards spread over a Redis Cluster.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

STREAM_PREFIX = "tollway:usage"
FIELD = b"e"
MAX_DIMS = 16
MAX_DIM_LEN = 128


def uuid7() -> str:
    """A time-ordered UUIDv7 (RFC 9562), so event ids sort by creation time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFFFFFFFFFF) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & 0x3FFFFFFFFFFFFFFF
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def shard_for(tenant_id: str, shards: int) -> int:
    return zlib.crc32(tenant_id.encode()) % shards


def stream_key(shard: int) -> str:
    return f"{{{STREAM_PREFIX}:{shard}}}"


class InvalidEvent(ValueError):
    """An entry that can never be stored; the consumer dead-letters it with this reason."""


@dataclass(slots=True)
class UsageEvent:
    tenant_id: str
    meter: str
    subject: str
    time_ms: int
    units: Decimal = Decimal(1)
    route: str = ""
    method: str = ""
    status: int = 0
    latency_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    dims: dict[str, str] = field(default_factory=dict)
    event_id: str = field(default_factory=uuid7)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "event_id": self.event_id,
                "tenant_id": self.tenant_id,
                "meter": self.meter,
                "subject": self.subject,
                "time": self.time_ms,
                "units": str(self.units),
                "route": self.route,
                "method": self.method,
                "status": self.status,
                "latency_ms": self.latency_ms,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "dims": self.dims,
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> UsageEvent:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent(f"not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise InvalidEvent("event is not a JSON object")
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> UsageEvent:
        try:
            event_id, tenant_id, meter = doc["event_id"], doc["tenant_id"], doc["meter"]
            time_ms = doc["time"]
        except KeyError as exc:
            raise InvalidEvent(f"missing field {exc.args[0]}") from exc
        for name, value in (("event_id", event_id), ("tenant_id", tenant_id), ("meter", meter)):
            if not isinstance(value, str) or not value:
                raise InvalidEvent(f"{name} must be a non-empty string")
        if not isinstance(time_ms, int) or isinstance(time_ms, bool) or time_ms <= 0:
            raise InvalidEvent("time must be a positive integer of epoch milliseconds")
        try:
            units = Decimal(str(doc.get("units", "1")))
        except InvalidOperation as exc:
            raise InvalidEvent("units must be a decimal number") from exc
        if not units.is_finite():
            raise InvalidEvent("units must be finite")
        dims = doc.get("dims") or {}
        if not isinstance(dims, dict) or len(dims) > MAX_DIMS:
            raise InvalidEvent(f"dims must be a map of at most {MAX_DIMS} entries")
        for k, v in dims.items():
            if not isinstance(v, str) or len(k) > MAX_DIM_LEN or len(v) > MAX_DIM_LEN:
                raise InvalidEvent("dims must map short strings to short strings")
        try:
            return cls(
                event_id=event_id,
                tenant_id=tenant_id,
                meter=meter,
                subject=str(doc.get("subject", "")),
                time_ms=time_ms,
                units=units,
                route=str(doc.get("route", "")),
                method=str(doc.get("method", "")),
                status=int(doc.get("status", 0)),
                latency_ms=float(doc.get("latency_ms", 0.0)),
                bytes_in=int(doc.get("bytes_in", 0)),
                bytes_out=int(doc.get("bytes_out", 0)),
                dims=dims,
            )
        except (TypeError, ValueError) as exc:
            raise InvalidEvent(f"bad numeric field: {exc}") from exc
