"""Usage analytics that an operator can explain in one sentence each.

- Anomalies: an hour is anomalous when it sits more than `threshold` standard deviations from
  the mean of the trailing `baseline_hours` (default 2σ over 168 h). σ is floored at 5% of the
  baseline mean (and 1 unit) so a perfectly steady series does not flag trivial wiggles.
- Forecast: a least-squares linear trend over the history plus the average residual for each
  hour of the day (daily seasonality), never below zero.
- Plan fit: peak quota utilization under 30% suggests the cheapest smaller plan that would
  still run at most 80% full; over 80% suggests the cheapest larger plan that brings it back
  under 80%. The advice carries the monthly price difference.
The functions take plain values; fetching the series and the plans is the callers' job.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal

from clickhouse_connect.driver.client import Client

from metering.meters import Meter
from metering.usage import usage

LOW_UTILIZATION = Decimal("0.30")
HIGH_UTILIZATION = Decimal("0.80")
HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class Point:
    at: datetime
    value: float


@dataclass(frozen=True)
class Anomaly:
    at: datetime
    value: float
    expected: float
    z: float


@dataclass(frozen=True)
class PlanOption:
    plan_id: str
    name: str
    price: Decimal | None
    quotas: Mapping[str, int]


@dataclass(frozen=True)
class Advice:
    action: Literal["upgrade", "downgrade", "keep"]
    utilization: dict[str, Decimal]
    peak: Decimal
    plan_id: str | None
    monthly_price_difference: Decimal | None
    reason: str


def hourly_series(
    client: Client, meter: Meter, tenant_id: str, start: datetime, end: datetime
) -> list[Point]:
    """The meter per UTC hour over [start, end), with empty hours as zero."""
    start = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    end = end.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    found = {r.period_start: float(r.value)
             for r in usage(client, meter, tenant_id, start, end, "hour", "UTC")}
    hours = int((end - start) / HOUR)
    return [Point(at, found.get(at, 0.0)) for at in (start + i * HOUR for i in range(hours))]


def anomalies(
    series: Sequence[Point], baseline_hours: int = 168, threshold: float = 2.0,
    min_baseline: int = 24,
) -> list[Anomaly]:
    if not 1 <= min_baseline <= baseline_hours:
        raise ValueError("need 1 <= min_baseline <= baseline_hours")
    found = []
    for i in range(min_baseline, len(series)):
        window = [p.value for p in series[max(0, i - baseline_hours):i]]
        mean = sum(window) / len(window)
        std = math.sqrt(sum((v - mean) ** 2 for v in window) / len(window))
        sigma = max(std, 0.05 * abs(mean), 1.0)
        z = (series[i].value - mean) / sigma
        if abs(z) > threshold:
            found.append(Anomaly(series[i].at, series[i].value, mean, z))
    return found


def forecast(series: Sequence[Point], hours: int = 168) -> list[Point]:
    """The next `hours` hours after the series: linear trend plus hour-of-day profile."""
    if not series:
        return []
    n = len(series)
    xs = range(n)
    ys = [p.value for p in series]
    x_mean, y_mean = (n - 1) / 2, sum(ys) / n
    var = sum((x - x_mean) ** 2 for x in xs)
    cov = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True))
    slope = cov / var if var else 0.0
    intercept = y_mean - slope * x_mean
    buckets: dict[int, list[float]] = {}
    for x, p in enumerate(series):
        buckets.setdefault(p.at.astimezone(UTC).hour, []).append(p.value - intercept - slope * x)
    profile = {h: sum(r) / len(r) for h, r in buckets.items()}
    last = series[-1].at
    out = []
    for k in range(1, hours + 1):
        at = last + k * HOUR
        trend = intercept + slope * (n - 1 + k)
        out.append(Point(at, max(0.0, trend + profile.get(at.astimezone(UTC).hour, 0.0))))
    return out


def utilization(used: Mapping[str, Decimal], quotas: Mapping[str, int]) -> dict[str, Decimal]:
    """used / limit per quota'd meter; a meter without a quota is unlimited and not listed."""
    out = {}
    for meter, limit in quotas.items():
        amount = used.get(meter, Decimal(0))
        if limit > 0:
            out[meter] = (amount / limit).quantize(Decimal("0.0001"))
        else:
            out[meter] = Decimal(0) if amount <= 0 else Decimal("Infinity")
    return out


def plan_fit(
    current: PlanOption, plans: Sequence[PlanOption], used: Mapping[str, Decimal]
) -> Advice:
    util = utilization(used, current.quotas)
    peak = max(util.values(), default=Decimal(0))
    action: Literal["upgrade", "downgrade"]
    if current.price is None or LOW_UTILIZATION <= peak <= HIGH_UTILIZATION:
        return Advice("keep", util, peak, None, None, "utilization is within 30%–80%"
                      if current.price is not None else "the current plan has no list price")
    fits = sorted(
        (p for p in plans if p.price is not None and p.plan_id != current.plan_id
         and max(utilization(used, p.quotas).values(), default=Decimal(0)) <= HIGH_UTILIZATION),
        key=lambda p: (p.price, p.plan_id),
    )
    if peak < LOW_UTILIZATION:
        cheaper = [p for p in fits if p.price is not None and p.price < current.price]
        if not cheaper:
            return Advice("keep", util, peak, None, None, "no cheaper plan fits this usage")
        pick, action = cheaper[0], "downgrade"
        why = f"peak utilization {peak:.0%} is under 30%"
    else:
        dearer = [p for p in fits if p.price is not None and p.price > current.price]
        if not dearer:
            return Advice("keep", util, peak, None, None,
                          f"peak utilization {peak:.0%} is over 80% and no larger plan fits")
        pick, action = dearer[0], "upgrade"
        why = f"peak utilization {peak:.0%} is over 80%"
    assert pick.price is not None
    return Advice(action, util, peak, pick.plan_id, pick.price - current.price,
                  f"{why}; {pick.name} would keep it under 80%")
