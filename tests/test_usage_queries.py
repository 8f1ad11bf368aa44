"""Usage queries on real chDB: rollups agree with the raw table, timezones, late events."""

from __future__ import annotations

import csv
import io
import itertools
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from clickhouse_connect.driver.client import Client
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send

from metering.events import UsageEvent
from metering.export import export_usage
from metering.ingest import insert_events
from metering.meters import Meter, load_meters, parse
from metering.schema import RAW_TABLE
from metering.usage import (
    Window,
    compare,
    month_bounds,
    pick_source,
    previous_month,
    quota_summary,
    total,
    totals,
    usage,
)
from metering.usage import zone as usage_zone
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem
from tenancy.settings import Settings

# a recent month start, well inside the raw TTL
REF = (datetime.now(UTC) - timedelta(days=45)).replace(
    day=1, hour=0, minute=0, second=0, microsecond=0
)


def _ev(
    at: datetime, meter: str = "api_calls", units: str = "1", tenant: str = "t1", **kw: Any
) -> UsageEvent:
    return UsageEvent(tenant_id=tenant, meter=meter, subject=kw.pop("subject", "k1"),
                      time_ms=int(at.timestamp() * 1000), units=Decimal(units), **kw)


@pytest.fixture
def meters(ch_settings: Settings) -> dict[str, Meter]:
    return load_meters(ch_settings)


@pytest.fixture
def loaded(ch: Client) -> Client:
    """~600 events over five days around a month boundary, two tenants, all meters."""
    rnd = random.Random(7)
    events = []
    for _ in range(600):
        at = REF + timedelta(minutes=rnd.randrange(-2 * 1440, 3 * 1440), seconds=rnd.random() * 59)
        meter = rnd.choice(["api_calls", "api_calls", "tokens", "storage_gb", "ai_interactions"])
        events.append(_ev(
            at, meter, units=str(rnd.randrange(1, 500)), tenant=rnd.choice(["t1", "t1", "t2"]),
            subject=f"k{rnd.randrange(6)}", route=rnd.choice(["/a", "/b/{id}"]),
            method=rnd.choice(["GET", "POST"]), status=rnd.choice([200, 404]),
            bytes_out=rnd.randrange(10_000), dims={"model": rnd.choice(["m1", "m2"])},
        ))
    for i in range(0, len(events), 100):
        insert_events(ch, events[i:i + 100], "gateway", f"load-{i}")
    return ch


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Kolkata"])
def test_rollups_agree_with_raw(loaded: Client, meters: dict[str, Meter], tz: str) -> None:
    start, end = REF - timedelta(days=3), REF + timedelta(days=4)
    expected_source = {"UTC": "usage_day", "America/New_York": "usage_hour",
                       "Asia/Kolkata": "usage_minute"}[tz]
    assert pick_source("day", tz, start, end) == expected_source
    for meter in meters.values():
        windows: tuple[Window, ...] = ("hour", "day", "month")
        for window, groups in itertools.product(windows,
                                                ((), meter.dimensions[:1])):
            fast = usage(loaded, meter, "t1", start, end, window, tz, groups)
            slow = usage(loaded, meter, "t1", start, end, window, tz, groups, source=RAW_TABLE)
            assert fast == slow, (meter.name, window, groups)
            assert fast, (meter.name, window)
        assert total(loaded, meter, "t1", start, end) == total(
            loaded, meter, "t1", start, end, source=RAW_TABLE
        )


def test_unaligned_ranges_fall_back_to_raw() -> None:
    start = REF + timedelta(seconds=30)
    assert pick_source("hour", "UTC", start, REF + timedelta(days=1)) == RAW_TABLE
    assert pick_source(None, "UTC", REF, REF + timedelta(hours=5)) == "usage_hour"
    assert pick_source("minute", "UTC", REF, REF + timedelta(days=1)) == "usage_minute"


def test_late_events_land_in_their_own_period(ch: Client, meters: dict[str, Meter]) -> None:
    api = meters["api_calls"]
    insert_events(ch, [_ev(REF + timedelta(hours=30))], "gateway", "on-time")
    # arrives later, belongs to the last hour of the previous month (UTC)
    insert_events(ch, [_ev(REF - timedelta(minutes=10))], "gateway", "late")
    start, end = REF - timedelta(days=40), REF + timedelta(days=40)
    months = usage(ch, api, "t1", start, end, "month", "UTC")
    assert [(r.period_start, r.value) for r in months] == [
        (month_bounds(REF - timedelta(days=1), "UTC")[0], Decimal(1)),
        (REF, Decimal(1)),
    ]
    hours = usage(ch, api, "t1", start, end, "hour", "UTC")
    assert hours[0].period_start == REF - timedelta(hours=1)
    # in New York, REF + 2h UTC is still the previous local month
    insert_events(ch, [_ev(REF + timedelta(hours=2))], "gateway", "ny")
    ny = usage(ch, api, "t1", start, end, "month", "America/New_York")
    assert [r.value for r in ny] == [Decimal(2), Decimal(1)]
    assert ny[0].period_start.tzinfo is not None
    assert ny[1].period_start.utcoffset() in (timedelta(hours=-4), timedelta(hours=-5))
    days = usage(ch, api, "t1", start, end, "day", "America/New_York")
    assert [r.value for r in days] == [Decimal(2), Decimal(1)]


def test_group_by_declared_dimensions_only(loaded: Client, meters: dict[str, Meter]) -> None:
    tokens = meters["tokens"]
    rows = usage(loaded, tokens, "t1", REF, REF + timedelta(days=1), "day", "UTC", ["model"])
    assert {r.dims["model"] for r in rows} == {"m1", "m2"}
    assert sum(r.value for r in rows) == total(loaded, tokens, "t1", REF, REF + timedelta(days=1))
    with pytest.raises(Problem) as err:
        usage(loaded, tokens, "t1", REF, REF + timedelta(days=1), "day", "UTC", ["route"])
    assert err.value.status == 422


def test_aggregations(ch: Client, meters: dict[str, Meter]) -> None:
    custom = parse({"meters": {
        "disk": {"aggregation": "LATEST", "value": "units"},
        "teams": {"aggregation": "UNIQUE_COUNT", "value": "dims.team", "event": "api_calls"},
    }})
    at = REF + timedelta(hours=3)
    insert_events(ch, [
        _ev(at, subject="a", dims={"team": "x"}), _ev(at, subject="b", dims={"team": "x"}),
        _ev(at + timedelta(minutes=1), subject="a", dims={"team": "y"}),
        _ev(at, "disk", "7"), _ev(at + timedelta(hours=2), "disk", "3"),
        _ev(at + timedelta(minutes=5), "storage_gb", "12"), _ev(at, "storage_gb", "4"),
    ], "gateway", "mix")
    insert_events(ch, [_ev(at, units="-1")], "correction", "fix")
    end = REF + timedelta(days=1)
    got = totals(ch, [*meters.values(), *custom.values()], "t1", REF, end)
    assert got["api_calls"] == 2  # three calls, one corrected away
    assert got["active_users"] == 2
    assert got["teams"] == 2
    assert got["disk"] == 3
    assert got["storage_gb"] == 12
    assert got["tokens"] == 0
    # minute-aligned range: a dims-based meter cannot use the dimensionless minute rollup
    odd_end = at + timedelta(minutes=7)
    assert total(ch, custom["teams"], "t1", REF, odd_end) == 2
    assert usage(ch, custom["teams"], "t1", REF, odd_end, "hour", "Asia/Kolkata")[-1].value == 2


def test_quota_summary_and_report() -> None:
    start, end = month_bounds(datetime(2026, 3, 15, 12, tzinfo=UTC), "Europe/Paris")
    assert start == datetime(2026, 2, 28, 23, tzinfo=UTC)
    assert end == datetime(2026, 3, 31, 22, tzinfo=UTC)  # DST starts on 29 March
    assert previous_month(start, "Europe/Paris") == (
        datetime(2026, 1, 31, 23, tzinfo=UTC), start
    )
    lines = quota_summary({"api_calls": Decimal(2500)}, {"api_calls": 10_000, "tokens": 0}, end)
    assert [(q.meter, q.used, q.percent) for q in lines] == [
        ("api_calls", Decimal(2500), Decimal("25.0")), ("tokens", Decimal(0), Decimal(0)),
    ]
    report = compare({"api_calls": Decimal(150)}, {"api_calls": Decimal(100), "tokens": Decimal(5)})
    assert [(r.meter, r.change, r.change_percent) for r in report] == [
        ("api_calls", Decimal(50), Decimal("50.0")), ("tokens", Decimal(-5), Decimal("-100.0")),
    ]


def test_export_csv_and_parquet(loaded: Client, tmp_path: Path) -> None:
    start, end = REF - timedelta(days=1), REF + timedelta(days=1)
    text = export_usage(loaded, "t1", start, end, "UTC", "csv").decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows and set(rows[0]) >= {"meter", "day", "route", "dims", "events", "units"}
    calls = sum(int(r["events"]) for r in rows if r["meter"] == "api_calls")
    assert calls == total(loaded, load_meters(Settings())["api_calls"], "t1", start, end)
    blob = export_usage(loaded, "t1", start, end, "UTC", "parquet")
    assert blob[:4] == b"PAR1"
    path = tmp_path / "usage.parquet"
    path.write_bytes(blob)
    back = loaded.query("SELECT count(), sum(events) FROM file({p:String}, Parquet)",
                        parameters={"p": str(path)}).result_rows
    assert back[0] == (len(rows), sum(int(r["events"]) for r in rows))


# --- the admin routes ---------------------------------------------------------------------

@pytest.fixture
async def api(ch: Client, sqlite_cp: ControlPlane) -> AsyncIterator[httpx.AsyncClient]:
    import httpx
    from sqlalchemy import insert
    from starlette.applications import Starlette

    from metering.usage_api import usage_routes
    from tenancy import plans
    from tenancy.admin_tokens import AdminPrincipal
    from tenancy.tables import tenants

    plans.ensure_defaults(sqlite_cp)
    now = datetime.now(UTC)
    with sqlite_cp.engine.begin() as conn:
        starter = plans.load(conn, "starter")
        for tid in ("t1", "t2"):
            conn.execute(insert(tenants).values(
                id=tid, name=tid, email=f"{tid}@example.com", plan_id="starter",
                plan_version=starter.version, status="active", region="us-east-1",
                locale="en", timezone="America/New_York", currency="USD", metadata={},
                settings={}, status_changed_at=now, created_at=now, updated_at=now,
            ))
    app = Starlette(routes=usage_routes(sqlite_cp))

    async def as_principal(scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        role = headers.get(b"x-role", b"platform").decode()
        tenant = headers.get(b"x-tenant", b"").decode() or None
        if role != "none":
            scope.setdefault("state", {})["principal"] = AdminPrincipal("tok", role, tenant, "t")
        await app(scope, receive, send)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=as_principal),
                                 base_url="http://admin") as client:
        yield client


async def test_api_usage_quota_report(api: httpx.AsyncClient, ch: Client) -> None:
    now = datetime.now(UTC)
    start, _ = month_bounds(now, "America/New_York")
    at = max(start + timedelta(minutes=1), now - timedelta(minutes=5))
    insert_events(ch, [_ev(at, subject=f"k{i}") for i in range(2500)], "gateway", "month")
    insert_events(ch, [_ev(at, "tokens", "7", dims={"model": "m1"})], "api", "tok")
    resp = await api.get("/tenants/t1/quota")
    assert resp.status_code == 200
    quotas = {q["meter"]: q for q in resp.json()["quotas"]}
    assert quotas["api_calls"]["used"] == "2500" and quotas["api_calls"]["limit"] == 10_000
    assert quotas["api_calls"]["percent"] == "25"
    assert quotas["api_calls"]["resets_at"] == resp.json()["to"]
    resp = await api.get("/tenants/t1/usage", params={"meter": "tokens", "window": "month",
                                                      "group_by": "model"})
    body = resp.json()
    assert body["tz"] == "America/New_York"
    local_start = start.astimezone(usage_zone("America/New_York")).isoformat()
    assert body["series"][0]["rows"] == [
        {"period_start": local_start, "dims": {"model": "m1"}, "value": "7"}
    ]
    resp = await api.get("/tenants/t1/report")
    lines = {ln["meter"]: ln for ln in resp.json()["lines"]}
    assert lines["api_calls"]["current"] == "2500" and lines["api_calls"]["previous"] == "0"
    assert lines["active_users"]["current"] == "2500"
    assert lines["api_calls"]["change_percent"] is None
    other = await api.get("/tenants/t2/quota")
    assert {q["meter"]: q["used"] for q in other.json()["quotas"]}["api_calls"] == "0"


async def test_api_enforces_the_path_tenant_and_validates(api: httpx.AsyncClient) -> None:
    own = await api.get("/tenants/t1/quota", headers={"x-role": "tenant", "x-tenant": "t1"})
    assert own.status_code == 200
    other = await api.get("/tenants/t2/quota", headers={"x-role": "tenant", "x-tenant": "t1"})
    assert other.status_code == 404
    assert other.headers["content-type"] == "application/problem+json"
    assert (await api.get("/tenants/nope/quota")).status_code == 404
    assert (await api.get("/tenants/t1/quota", headers={"x-role": "none"})).status_code == 401
    for params in ({"window": "week"}, {"meter": "nope"}, {"tz": "Mars/Base"},
                   {"from": "2026-02-01", "to": "2026-01-01"}, {"from": "yesterday"},
                   {"meter": "tokens", "group_by": "route"}):
        resp = await api.get("/tenants/t1/usage", params=params)
        assert resp.status_code == 422, params
        assert resp.headers["content-type"] == "application/problem+json"
    assert (await api.get("/tenants/t1/export", params={"format": "xml"})).status_code == 422


async def test_api_export(api: httpx.AsyncClient, ch: Client) -> None:
    at = datetime.now(UTC) - timedelta(hours=1)
    insert_events(ch, [_ev(at), _ev(at)], "gateway", "exp")
    day = at.date()
    params = {"from": (day - timedelta(days=1)).isoformat(),
              "to": (day + timedelta(days=2)).isoformat(), "tz": "UTC"}
    csv_resp = await api.get("/tenants/t1/export", params={**params, "format": "csv"})
    assert csv_resp.status_code == 200
    assert csv_resp.headers["content-type"].startswith("text/csv")
    assert "attachment" in csv_resp.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(csv_resp.text)))
    assert [(r["meter"], r["events"]) for r in rows] == [("api_calls", "2")]
    pq = await api.get("/tenants/t1/export", params={**params, "format": "parquet"})
    assert pq.content[:4] == b"PAR1"


async def test_api_analytics(api: httpx.AsyncClient, ch: Client) -> None:
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    spike = now - timedelta(hours=30)
    events = []
    for h in range(1, 24 * 9):
        at = now - timedelta(hours=h)
        events += [_ev(at + timedelta(minutes=m)) for m in range(60 if at == spike else 3)]
    insert_events(ch, events, "gateway", "hours")
    resp = await api.get("/tenants/t1/analytics", params={"meter": "api_calls"})
    assert resp.status_code == 200
    body = resp.json()
    assert [a["at"] for a in body["anomalies"]] == [spike.isoformat()]
    assert len(body["forecast"]["hourly"]) == 168
    assert body["forecast"]["total_7d"] > 0
    assert body["plan_fit"]["action"] in {"keep", "upgrade", "downgrade"}
    assert "api_calls" in body["plan_fit"]["utilization"]
    bad = await api.get("/tenants/t1/analytics", params={"threshold": "0"})
    assert bad.status_code == 422


@hyp_settings(max_examples=80, deadline=None)
@given(
    tz=st.sampled_from(["UTC", "Europe/London", "America/New_York", "Asia/Kolkata",
                        "Asia/Kathmandu", "Australia/Lord_Howe", "Pacific/Chatham"]),
    start_min=st.integers(0, 60 * 24 * 400),
    length_min=st.integers(1, 60 * 24 * 100),
    window=st.sampled_from(["minute", "hour", "day", "month", None]),
    grouped=st.booleans(),
)
def test_pick_source_only_picks_tables_whose_buckets_fit(
    tz: str, start_min: int, length_min: int, window: Window | None, grouped: bool
) -> None:
    """Every boundary the query needs must be a bucket edge of the chosen table."""
    start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=start_min)
    end = start + timedelta(minutes=length_min)
    table = pick_source(window, tz, start, end, grouped)
    if table == RAW_TABLE:
        return
    step = {"usage_minute": 60, "usage_hour": 3600, "usage_day": 86400}[table]
    assert not (grouped and table == "usage_minute")
    assert start.timestamp() % step == 0 and end.timestamp() % step == 0
    if window is None:
        return
    local = usage_zone(tz)
    at = start
    while at < end:  # every local window start inside the range is on a bucket edge
        off = at.astimezone(local).utcoffset()
        assert off is not None and off.total_seconds() % step == 0
        at += timedelta(hours=6)
