"""Analytics: anomalies on real hourly rollups, forecast shape, plan-fit advice."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from clickhouse_connect.driver.client import Client
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.analytics import (
    PlanOption,
    Point,
    anomalies,
    forecast,
    hourly_series,
    plan_fit,
    utilization,
)
from metering.events import UsageEvent
from metering.ingest import insert_events
from metering.meters import load_meters
from tenancy.settings import Settings

START = (datetime.now(UTC) - timedelta(days=20)).replace(minute=0, second=0, microsecond=0)
HOUR = timedelta(hours=1)


def _series(values: list[float] | list[int]) -> list[Point]:
    return [Point(START + i * HOUR, float(v)) for i, v in enumerate(values)]


def _daily(i: int, base: float = 100, amplitude: float = 30) -> float:
    wobble = ((i * 7919) % 13 - 6) / 2  # deterministic noise in [-3, 3]
    return base + amplitude * math.sin(2 * math.pi * (i % 24) / 24) + wobble


def test_no_false_positive_on_flat_or_seasonal_series() -> None:
    assert anomalies(_series([50] * 300)) == []
    assert anomalies(_series([_daily(i) for i in range(400)])) == []


def test_injected_spike_is_found() -> None:
    values = [_daily(i) for i in range(400)]
    values[300] = 400
    found = anomalies(_series(values))
    assert [a.at for a in found] == [START + 300 * HOUR]
    assert found[0].z > 2 and 90 < found[0].expected < 110
    flat = [50.0] * 200
    flat[150] = 80
    assert [a.at for a in anomalies(_series(flat), baseline_hours=48)] == [START + 150 * HOUR]
    assert anomalies(_series(flat), threshold=30) == []


def test_spike_in_chdb_rollups_is_found(ch: Client, ch_settings: Settings) -> None:
    meter = load_meters(ch_settings)["api_calls"]
    events = []
    for h in range(24 * 8):
        n = 40 if h == 24 * 7 + 5 else 4
        at = START + h * HOUR
        events += [UsageEvent("t1", "api_calls", "k", int((at + timedelta(minutes=m)).timestamp()
                                                          * 1000)) for m in range(n)]
    insert_events(ch, events, "gateway", "series")
    series = hourly_series(ch, meter, "t1", START, START + 8 * 24 * HOUR)
    assert len(series) == 192 and series[0].value == 4
    found = anomalies(series)
    assert [a.at for a in found] == [START + (24 * 7 + 5) * HOUR]
    assert found[0].value == 40


def test_forecast_extends_trend_and_daily_shape() -> None:
    values = [10 + 0.5 * i + 20 * math.sin(2 * math.pi * (i % 24) / 24) for i in range(24 * 14)]
    series = _series(values)
    ahead = forecast(series)
    assert len(ahead) == 168 and ahead[0].at == series[-1].at + HOUR
    for k, p in enumerate(ahead[:48], start=len(values)):
        expected = 10 + 0.5 * k + 20 * math.sin(2 * math.pi * (k % 24) / 24)
        assert abs(p.value - expected) < 2.0  # the sine leaks slightly into the fitted slope
    assert all(p.value == 5 for p in forecast(_series([5] * 48), hours=24))
    assert all(p.value >= 0 for p in forecast(_series([100 - i for i in range(100)])))


PLANS = [
    PlanOption("starter", "Starter", Decimal("29.00"), {"api_calls": 10_000, "tokens": 1_000}),
    PlanOption("professional", "Professional", Decimal("99.00"),
               {"api_calls": 100_000, "tokens": 10_000}),
    PlanOption("enterprise", "Enterprise", Decimal("299.00"),
               {"api_calls": 1_000_000, "tokens": 100_000}),
    PlanOption("custom", "Custom", None, {}),
]


def test_plan_fit_advice() -> None:
    pro, starter, enterprise = PLANS[1], PLANS[0], PLANS[2]
    low = plan_fit(pro, PLANS, {"api_calls": Decimal(5_000), "tokens": Decimal(700)})
    assert (low.action, low.plan_id, low.monthly_price_difference) == (
        "downgrade", "starter", Decimal("-70.00"))
    assert low.peak == Decimal("0.07")
    # tokens would be 90% full on Starter: no smaller plan fits
    tight = plan_fit(pro, PLANS, {"api_calls": Decimal(5_000), "tokens": Decimal(900)})
    assert (tight.action, tight.plan_id) == ("keep", None)
    assert "no cheaper plan" in tight.reason
    assert plan_fit(pro, PLANS, {"tokens": Decimal(2_900)}).action == "keep"
    high = plan_fit(starter, PLANS, {"api_calls": Decimal(9_000)})
    assert (high.action, high.plan_id, high.monthly_price_difference) == (
        "upgrade", "professional", Decimal("70.00"))
    huge = plan_fit(starter, PLANS, {"api_calls": Decimal(500_000)})
    assert (huge.action, huge.plan_id) == ("upgrade", "enterprise")
    top = plan_fit(enterprise, PLANS, {"api_calls": Decimal(990_000)})
    assert (top.action, top.plan_id) == ("keep", None)
    assert "no larger plan" in top.reason
    mid = plan_fit(pro, PLANS, {"api_calls": Decimal(50_000)})
    assert (mid.action, mid.peak) == ("keep", Decimal("0.5"))
    assert utilization({"api_calls": Decimal(3)}, {"api_calls": 0}) == {
        "api_calls": Decimal("Infinity")}


@settings(max_examples=50, deadline=None)
@given(level=st.floats(0, 1e6), length=st.integers(25, 300), spike_at=st.integers(24, 299),
       factor=st.floats(1.5, 50))
def test_steady_series_flags_only_the_spike(level: float, length: int, spike_at: int,
                                            factor: float) -> None:
    values = [level] * length
    assert anomalies(_series(values)) == []
    if spike_at < length:
        # the σ floor is max(5% of the mean, 1): anything beyond 2 floors is flagged
        values[spike_at] = level + 2.01 * max(0.05 * level, 1.0) * factor
        assert [a.at for a in anomalies(_series(values))] == [START + spike_at * HOUR]
