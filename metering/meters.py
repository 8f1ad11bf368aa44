"""Meters: how raw usage rows become a number a plan or an invoice can refer to.

Declared in TOML so operators add a meter without code. A meter reads the raw rows of one
`event` (usually its own name) and aggregates one `value` of them; the rollups keep a state
for every supported (aggregation, value) pair, so any declared meter is answerable from them.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from tenancy.problems import invalid
from tenancy.settings import Settings

DEFAULT_FILE = Path(__file__).with_name("default_meters.toml")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
DIM_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class Aggregation(StrEnum):
    SUM = "SUM"
    COUNT = "COUNT"
    MAX = "MAX"
    UNIQUE_COUNT = "UNIQUE_COUNT"
    LATEST = "LATEST"


_VALUES: dict[Aggregation, tuple[str, ...]] = {
    Aggregation.SUM: ("units", "bytes_in", "bytes_out"),
    Aggregation.COUNT: ("events",),
    Aggregation.MAX: ("units",),
    Aggregation.LATEST: ("units",),
    Aggregation.UNIQUE_COUNT: ("subject",),
}


@dataclass(frozen=True)
class Meter:
    name: str
    aggregation: Aggregation
    value: str
    event: str
    dimensions: tuple[str, ...] = ()
    description: str = ""

    @property
    def ingestible(self) -> bool:
        """Apps may report it directly: its rows are its own, not another meter's."""
        return self.event == self.name

    @property
    def dim_key(self) -> str | None:
        """The dims key counted by a UNIQUE_COUNT over `dims.<key>`."""
        return self.value.removeprefix("dims.") if self.value.startswith("dims.") else None


def parse(doc: dict[str, Any], where: str = "meters") -> dict[str, Meter]:
    table = doc.get("meters")
    if not isinstance(table, dict) or not table:
        raise invalid("a meters file needs a non-empty [meters] table", where)
    return {name: _meter(name, spec, f"{where}.{name}") for name, spec in table.items()}


def _meter(name: str, spec: Any, where: str) -> Meter:
    if not NAME.match(name):
        raise invalid(f"meter name {name!r} must match {NAME.pattern}", where)
    if not isinstance(spec, dict):
        raise invalid("a meter is a table", where)
    unknown = set(spec) - {"aggregation", "value", "event", "dimensions", "description"}
    if unknown:
        raise invalid(f"unknown meter keys: {sorted(unknown)}", where)
    try:
        aggregation = Aggregation(str(spec.get("aggregation", "")).upper())
    except ValueError:
        raise invalid(
            f"aggregation must be one of {[a.value for a in Aggregation]}", f"{where}.aggregation"
        ) from None
    value = str(spec.get("value", _VALUES[aggregation][0]))
    dim_value = aggregation is Aggregation.UNIQUE_COUNT and value.startswith("dims.")
    if value not in _VALUES[aggregation] and not (dim_value and DIM_KEY.match(value[5:])):
        raise invalid(f"{aggregation} cannot aggregate {value!r}", f"{where}.value")
    event = str(spec.get("event", name))
    if not NAME.match(event):
        raise invalid(f"event {event!r} must match {NAME.pattern}", f"{where}.event")
    dims = spec.get("dimensions", [])
    if not isinstance(dims, list) or not all(isinstance(d, str) and DIM_KEY.match(d) for d in dims):
        raise invalid("dimensions must be a list of names", f"{where}.dimensions")
    return Meter(
        name=name,
        aggregation=aggregation,
        value=value,
        event=event,
        dimensions=tuple(dims),
        description=str(spec.get("description", "")),
    )


def load_meters(settings: Settings) -> dict[str, Meter]:
    path = settings.meters_file or DEFAULT_FILE
    with Path(path).open("rb") as fh:
        return parse(tomllib.load(fh), str(path))
