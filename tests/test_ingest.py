"""CloudEvents ingestion on real Redis and chDB: validation, dedup, batch outcomes."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from clickhouse_connect.driver.client import Client
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from metering.ingest import DEDUP_TTL_S, Rejected, dedup_key, ingest, parse_cloudevent
from metering.ingest_api import BATCH, MAX_BODY, SINGLE, ingest_routes
from metering.meters import Meter, load_meters
from tenancy.settings import Settings

NOW = datetime.now(UTC).replace(microsecond=0)


def _ce(i: int = 1, **kw: Any) -> dict[str, Any]:
    doc = {"specversion": "1.0", "id": f"ev-{i}", "source": "app://billing", "type": "tokens",
           "time": (NOW - timedelta(minutes=1)).isoformat(),
           "data": {"units": 10, "dims": {"model": "m1"}}}
    doc.update(kw)
    return {k: v for k, v in doc.items() if v is not None}


@pytest.fixture
def meters(ch_settings: Settings) -> dict[str, Meter]:
    return load_meters(ch_settings)


@pytest.mark.parametrize(("change", "reason"), [
    ({"specversion": "0.3"}, "specversion"),
    ({"specversion": None}, "specversion"),
    ({"id": ""}, "id must"),
    ({"id": 7}, "id must"),
    ({"source": None}, "source must"),
    ({"type": "nope"}, "type must name"),
    ({"type": "bytes_out"}, "type must name"),  # derived from gateway events, not reportable
    ({"time": "yesterday"}, "RFC 3339"),
    ({"time": NOW.replace(tzinfo=None).isoformat()}, "offset"),
    ({"time": (NOW - timedelta(days=35, seconds=1)).isoformat()}, "35 days"),
    ({"time": (NOW + timedelta(minutes=5, seconds=1)).isoformat()}, "5 minutes"),
    ({"data": None}, "data must"),
    ({"data": {"units": "ten"}}, "units must be a number"),
    ({"data": {"units": True}}, "units must be a number"),
    ({"data": {"units": "NaN"}}, "finite"),
    ({"data": {"units": "1e40"}}, "finite"),
    ({"data": {"units": "0.0000000001"}}, "9 decimal"),
    ({"data": {"units": 1, "dims": {"k": 1}}}, "dims"),
    ({"data": {"units": 1, "dims": {f"k{i}": "v" for i in range(17)}}}, "dims"),
    ({"datacontenttype": "text/plain"}, "datacontenttype"),
    ({"subject": 12}, "subject"),
])
def test_validation_matrix(meters: dict[str, Meter], change: dict[str, Any], reason: str) -> None:
    with pytest.raises(Rejected, match=reason):
        parse_cloudevent(_ce(**change), meters, "t1", NOW)


def test_valid_event_fields(meters: dict[str, Meter]) -> None:
    at = NOW - timedelta(days=34, hours=23)
    ev = parse_cloudevent(_ce(time=at.isoformat().replace("+00:00", "Z"), subject="u1",
                              data={"units": "2.125", "dims": {"model": "m2"}}), meters, "t1", NOW)
    assert (ev.meter, ev.subject, ev.units, ev.dims) == ("tokens", "u1", Decimal("2.125"),
                                                         {"model": "m2"})
    assert ev.time_ms == int(at.timestamp() * 1000)
    again = parse_cloudevent(_ce(), meters, "t1", NOW)
    assert again.event_id == parse_cloudevent(_ce(), meters, "t1", NOW).event_id
    assert again.event_id != parse_cloudevent(_ce(), meters, "t2", NOW).event_id
    no_time = _ce(time=None)
    assert parse_cloudevent(no_time, meters, "t1", NOW).time_ms == int(NOW.timestamp() * 1000)
    ahead = parse_cloudevent(_ce(time=(NOW + timedelta(minutes=5)).isoformat()), meters, "t", NOW)
    assert ahead.time_ms == int((NOW + timedelta(minutes=5)).timestamp() * 1000)


def test_dedup_key_carries_the_tenant_hash_tag() -> None:
    digest = hashlib.sha1(b"app://x\x00ev-1", usedforsecurity=False).hexdigest()
    assert dedup_key("t1", "app://x", "ev-1") == f"{{t:t1}}:ce:{digest}"


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def http(
    ch: Client, ch_settings: Settings, aredis: Redis, meters: dict[str, Meter]
) -> AsyncIterator[httpx.AsyncClient]:
    app = Starlette(routes=ingest_routes(ch_settings, aredis, meters))

    async def with_tenant(scope: Scope, receive: Receive, send: Send) -> None:
        tenant = dict(scope.get("headers", [])).get(b"x-test-tenant")
        if tenant:
            scope["tollway.tenant_id"] = tenant.decode()
        await app(scope, receive, send)

    transport = httpx.ASGITransport(app=with_tenant)
    async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                 headers={"x-test-tenant": "t1"}) as client:
        yield client


def _post(
    http: httpx.AsyncClient, body: Any, ctype: str = SINGLE, **headers: str
) -> Awaitable[httpx.Response]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return http.post("/v1/events", content=data, headers={"content-type": ctype, **headers})


def _units(ch: Client, tenant: str = "t1") -> tuple[Sequence[Any], Sequence[Any]]:
    raw = ch.query("SELECT count(), sum(units) FROM usage_events WHERE tenant_id = {t:String}",
                   parameters={"t": tenant}).result_rows[0]
    hour = ch.query("SELECT countMerge(events), sumMerge(units_sum) FROM usage_hour "
                    "WHERE tenant_id = {t:String}", parameters={"t": tenant}).result_rows[0]
    return raw, hour


async def test_single_event_is_stored_once_across_retries(
    http: httpx.AsyncClient, ch: Client, aredis: Redis
) -> None:
    first = await _post(http, _ce())
    assert first.status_code == 200 and first.json() == {"id": "ev-1", "status": "accepted"}
    again = await _post(http, _ce())
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert _units(ch) == ((1, Decimal(10)), (1, Decimal(10)))
    assert ch.query("SELECT DISTINCT source FROM usage_events").result_rows == [("api",)]
    ttl = await aredis.ttl(dedup_key("t1", "app://billing", "ev-1"))
    assert 35 * 86400 + 5 * 60 <= ttl <= DEDUP_TTL_S
    # the same (source, id) from another tenant is a different event
    other = await _post(http, _ce(), **{"x-test-tenant": "t2"})
    assert other.json()["status"] == "accepted"


async def test_rejected_single_event_is_problem_json(http: httpx.AsyncClient, ch: Client) -> None:
    resp = await _post(http, _ce(type="unknown"))
    assert resp.status_code == 422
    assert resp.headers["content-type"] == "application/problem+json"
    assert "type must name" in resp.json()["detail"] and resp.json()["id"] == "ev-1"
    assert _units(ch)[0][0] == 0


async def test_batch_reports_each_event(http: httpx.AsyncClient, ch: Client) -> None:
    await _post(http, _ce(5))
    batch = [_ce(1), _ce(2, data={"units": "x"}), _ce(3), _ce(3), _ce(5), "junk"]
    resp = await _post(http, batch, BATCH)
    assert resp.status_code == 207
    body = resp.json()
    assert [(r["index"], r["status"]) for r in body["results"]] == [
        (0, "accepted"), (1, "rejected"), (2, "accepted"), (3, "duplicate"), (4, "duplicate"),
        (5, "rejected"),
    ]
    assert "units" in body["results"][1]["reason"]
    assert (body["accepted"], body["duplicate"], body["rejected"]) == (2, 2, 2)
    assert _units(ch) == ((3, Decimal(30)), (3, Decimal(30)))
    ok = await _post(http, [_ce(6), _ce(7)], BATCH)
    assert ok.status_code == 200 and ok.json()["accepted"] == 2
    bad = await _post(http, [_ce(8, specversion="2")], BATCH)
    assert bad.status_code == 422


@pytest.mark.parametrize(("body", "ctype", "status"), [
    (b"{not json", SINGLE, 400),
    (b"{}", "application/json", 415),
    (b"{}", "text/plain", 415),
    (b'{"a": 1}', BATCH, 400),
    (b"[]", BATCH, 400),
    (b"[" + b",".join([b"{}"] * 1001) + b"]", BATCH, 413),
    (b" " * (MAX_BODY + 1), SINGLE, 413),
])
async def test_bad_requests(http: httpx.AsyncClient, body: bytes, ctype: str, status: int) -> None:
    resp = await _post(http, body, ctype)
    assert resp.status_code == status
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["status"] == status


async def test_no_tenant_in_scope_is_401(http: httpx.AsyncClient) -> None:
    resp = await http.post("/v1/events", content=orjson.dumps(_ce()),
                           headers={"content-type": SINGLE, "x-test-tenant": ""})
    assert resp.status_code == 401
    assert resp.headers["content-type"] == "application/problem+json"


async def test_failed_store_releases_dedup_keys_so_a_retry_is_accepted(
    ch: Client, aredis: Redis, meters: dict[str, Meter]
) -> None:
    ch.command("RENAME TABLE usage_events TO usage_events_away")
    with pytest.raises(Exception, match="usage_events"):
        await ingest(aredis, ch, meters, "t1", [_ce(1)], datetime.now(UTC))
    assert await aredis.exists(dedup_key("t1", "app://billing", "ev-1")) == 0
    ch.command("RENAME TABLE usage_events_away TO usage_events")
    outcomes = await ingest(aredis, ch, meters, "t1", [_ce(1)], datetime.now(UTC))
    assert outcomes[0].status == "accepted"
    assert _units(ch) == ((1, Decimal(10)), (1, Decimal(10)))
