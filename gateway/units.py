"""The upstream's usage report: `Tollway-Units: tokens=1234, images=2`.

The header comes from a service we do not control and ends up on an invoice, so parsing is
strict and bounded, and never fails the client's request: a bad entry is skipped and counted
(`tollway_units_invalid_total`) so an operator can see a misbehaving upstream. Duplicate names
add up, so an upstream may send one line per unit kind.
"""

from __future__ import annotations

import re
from decimal import Decimal

from prometheus_client import Counter

MAX_HEADER_BYTES = 1024
MAX_ENTRIES = 16
# Non-negative plain decimals only: no exponent, NaN or Infinity, and bounded precision.
_ENTRY = re.compile(rb"\s*([a-z][a-z0-9_.-]{0,63})\s*=\s*(\d{1,18}(?:\.\d{1,12})?)\s*")

invalid_units = Counter(
    "tollway_units_invalid", "Tollway-Units entries from upstreams that were ignored", ["reason"]
)


def parse_units(value: bytes | None) -> dict[str, Decimal]:
    if not value:
        return {}
    if len(value) > MAX_HEADER_BYTES:
        invalid_units.labels("too_long").inc()
        return {}
    units: dict[str, Decimal] = {}
    for entry in value.split(b","):
        if not entry.strip():
            continue
        match = _ENTRY.fullmatch(entry.lower())
        if match is None:
            invalid_units.labels("malformed").inc()
            continue
        name = match[1].decode()
        if name not in units and len(units) >= MAX_ENTRIES:
            invalid_units.labels("too_many").inc()
            continue
        units[name] = units.get(name, Decimal(0)) + Decimal(match[2].decode())
    return units
