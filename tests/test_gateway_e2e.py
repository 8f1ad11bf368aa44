"""The whole hot path: a tenant and key made through the control plane, the Gateway in
front of a real aiohttp upstream on loopback, admission and usage on real Redis.

The harness here (Upstream, Stack, make_stack) is shared by the hostile-input and
Redis-failure tests, which import it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import redis
from aiohttp import web
from prometheus_client import REGISTRY

from gateway.admission import month_window, quota_key
from gateway.gateway import Gateway
from gateway.observability import JsonFormatter, access_log
from gateway.tenant_signature import TenantSigner
from metering.events import FIELD, UsageEvent, shard_for, stream_key
from tenancy import keys, plans, tenants
from tenancy.controlplane import ControlPlane
from tenancy.settings import Settings

SIGNING_KEY = "k" * 40
SIGNER = TenantSigner([SIGNING_KEY.encode()])

LIMITS: dict[str, Any] = {"rate_per_second": 1000, "burst": 1000, "concurrency": 50,
                          "fail_mode": "closed"}
PLANS: dict[str, Any] = {
    "roomy": {"name": "Roomy", "trial_days": 0, "limits": LIMITS,
              "quotas": {"api_calls": 1000, "ai_interactions": 5}},
    "trialy": {"name": "Trialy", "trial_days": 14, "limits": LIMITS,
               "quotas": {"api_calls": 1000}},
    "ratey": {"name": "Ratey", "trial_days": 0,
              "limits": {**LIMITS, "rate_per_second": 0.5, "burst": 2}},
    "quotay": {"name": "Quotay", "trial_days": 0, "limits": LIMITS, "quotas": {"api_calls": 2}},
    "solo": {"name": "Solo", "trial_days": 0, "limits": {**LIMITS, "concurrency": 1}},
    "open": {"name": "Open", "trial_days": 0,
             "limits": {**LIMITS, "fail_mode": "open", "local_rate_per_second": 3}},
}


class Upstream:
    """Echoes what it received as JSON; query parameters make it misbehave: `units=` sets
    Tollway-Units, `hop=1` sends a Connection-named header, `sleep=` delays, `big=` streams
    that many bytes."""

    def __init__(self) -> None:
        self.hits = 0
        self.arrived = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        self.url = ""

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def close(self) -> None:
        await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.arrived.set()
        body = await request.read()
        query = request.query
        if "sleep" in query:
            await asyncio.sleep(float(query["sleep"]))
        if "big" in query:
            n = int(query["big"])
            resp = web.StreamResponse(headers={"Content-Length": str(n)})
            await resp.prepare(request)
            chunk = b"x" * 65536
            for offset in range(0, n, len(chunk)):
                await resp.write(chunk[: n - offset])
            return resp
        headers = {}
        if "units" in query:
            headers["Tollway-Units"] = query["units"]
        if "hop" in query:
            headers.update({"Connection": "X-Secret", "X-Secret": "1", "X-Public": "yes"})
        doc = {
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            "body_len": len(body),
        }
        return web.json_response(doc, headers=headers)


def sent_headers(response: httpx.Response) -> dict[str, str]:
    """The headers the upstream received, lowercased (the last value of each name)."""
    return {k.lower(): v for k, v in response.json()["headers"]}


@dataclasses.dataclass
class Stack:
    cp: ControlPlane
    settings: Settings
    gateway: Gateway
    client: httpx.AsyncClient
    redis: redis.Redis


async def make_stack(cp: ControlPlane, tmp_path: Any, **overrides: Any) -> AsyncIterator[Stack]:
    """Start a Gateway on `cp`'s store and Redis (tenants must exist already: the snapshot
    is loaded at start) and yield it with an httpx client bound to it."""
    # a generous admission timeout: a loaded CI machine must not turn into a Redis outage
    overrides = {"redis_timeout_ms": 1000, **overrides}
    settings = dataclasses.replace(
        cp.settings, tenant_signing_keys=(SIGNING_KEY,), data_dir=tmp_path / "gw", **overrides,
    )
    gateway = Gateway.from_settings(settings, cp.engine)
    await gateway.start()
    transport = httpx.ASGITransport(app=gateway)
    client = httpx.AsyncClient(transport=transport, base_url="http://gw.test", timeout=10)
    hot = redis.Redis.from_url(str(settings.redis_url))
    # Wait for the change listener to subscribe: redis-py 8.1 can hang a task cancelled in
    # the middle of connecting, and Gateway.close would then wait CLOSE_REFRESHER_S for it.
    for _ in range(200):
        if dict(hot.pubsub_numsub(settings.change_channel)).get(
                settings.change_channel.encode()):
            break
        await asyncio.sleep(0.01)
    try:
        yield Stack(cp, settings, gateway, client, hot)
    finally:
        await client.aclose()
        await gateway.close()
        hot.close()


def new_tenant(cp: ControlPlane, name: str, plan: str, upstream: str | None,
               **kw: Any) -> tuple[str, str]:
    """A tenant and one key; returns (tenant_id, secret)."""
    tenant = tenants.create(cp, actor="test", name=name, email=f"{name}@example.com", plan=plan,
                            upstream=upstream, **kw)
    _, secret = keys.create(cp, tenant["id"], actor="test")
    return tenant["id"], secret


def events(stack: Stack, tenant_id: str) -> list[UsageEvent]:
    key = stream_key(shard_for(tenant_id, stack.settings.usage_shards))
    entries: list[tuple[bytes, dict[bytes, bytes]]] = stack.redis.xrange(key)  # type: ignore[assignment]
    found = [UsageEvent.from_bytes(fields[FIELD]) for _, fields in entries]
    return [e for e in found if e.tenant_id == tenant_id]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.close()


@dataclasses.dataclass
class World:
    stack: Stack
    ids: dict[str, str]
    secrets: dict[str, str]


@pytest.fixture
async def world(sqlite_cp: ControlPlane, tmp_path: Any, upstream: Upstream) -> AsyncIterator[World]:
    cp = sqlite_cp
    plans.apply(cp, {"plans": PLANS}, "test")
    ids, secrets = {}, {}
    for name, plan in [("acme", "roomy"), ("ratey", "ratey"), ("quotay", "quotay"),
                       ("solo", "solo"), ("susp", "roomy"), ("trial", "trialy"),
                       ("gone", "roomy"), ("revoked", "roomy"), ("routed", "roomy")]:
        settings = ({"routes": [{"prefix": "/admin", "scopes": ["admin:write"]}]}
                    if name == "routed" else None)
        # the trial tenant signed up a month ago: its 14-day trial is over
        when = datetime.now(UTC) - timedelta(days=30) if name == "trial" else None
        ids[name], secrets[name] = new_tenant(cp, name, plan, upstream.url, settings=settings,
                                              now=when)
    tenants.transition(cp, ids["susp"], "suspend", actor="test")
    long_ago = datetime.now(UTC) - timedelta(days=40)  # so the deprovisioning grace is over
    for action, when in (("cancel", long_ago), ("start_deprovisioning", long_ago),
                         ("delete", None)):
        tenants.transition(cp, ids["gone"], action, actor="test", now=when)
    with cp.engine.connect() as conn:
        key_id = keys.list_keys(conn, ids["revoked"])[0]["id"]
    keys.revoke(cp, key_id, actor="test")
    past = datetime.now(UTC) - timedelta(hours=2)
    _, secrets["expired"] = keys.create(cp, ids["acme"], actor="test", name="old", now=past,
                                        expires_at=past + timedelta(hours=1))
    async for stack in make_stack(cp, tmp_path):
        yield World(stack, ids, secrets)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_request_passes_with_signed_tenant_and_is_metered(
    world: World, upstream: Upstream
) -> None:
    stack, tid = world.stack, world.ids["acme"]
    before = sample("tollway_gateway_requests_total", status_class="2xx", tenant=tid)
    r = await stack.client.post(
        "/v1/orders/123?x=1", content=b"hello",
        headers={"X-API-Key": world.secrets["acme"], "X-Tenant-ID": tid,
                 "X-Tollway-Tenant": "t=forged", "Tollway-Units": "tokens=9"},
    )
    assert r.status_code == 200, r.text
    seen = sent_headers(r)
    assert r.json()["path"] == "/v1/orders/123?x=1"
    claims = SIGNER.verify(seen["x-tollway-tenant"], max_age_s=60)
    assert claims is not None and claims.tenant_id == tid
    assert "x-api-key" not in seen and "x-tenant-id" not in seen and "tollway-units" not in seen
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "gw.test"
    assert seen["x-request-id"] == r.headers["x-request-id"]
    assert "ratelimit-policy" in r.headers and r.headers["ratelimit"].startswith('"')
    assert "tollway-units" not in r.headers

    await stack.gateway.emitter.flush()
    [event] = events(stack, tid)
    assert (event.meter, event.status, event.method, event.route) == ("api_calls", 200, "POST",
                                                                      "/v1/*")
    assert event.bytes_in == 5 and event.bytes_out == len(r.content)
    assert event.subject == claims.key_id and event.dims["request_id"] == r.headers["x-request-id"]
    after = sample("tollway_gateway_requests_total", status_class="2xx", tenant=tid)
    assert after == before + 1


async def test_upstream_units_become_events_and_feed_checked_quotas(
    world: World, upstream: Upstream
) -> None:
    stack, tid = world.stack, world.ids["acme"]
    r = await stack.client.get("/chat?units=tokens%3D1234,ai_interactions%3D5",
                               headers={"Authorization": f"Bearer {world.secrets['acme']}"})
    assert r.status_code == 200 and "tollway-units" not in r.headers
    await stack.gateway.emitter.flush()
    by_meter = {e.meter: e for e in events(stack, tid)}
    assert str(by_meter["tokens"].units) == "1234" and by_meter["tokens"].route == "/chat/*"
    assert by_meter["api_calls"].bytes_out == len(r.content)
    await asyncio.gather(*stack.gateway._tasks)
    month, _ = month_window(world.stack.gateway.refresher.snapshot.tenants[tid].tz,
                            int(datetime.now(UTC).timestamp() * 1000))
    assert stack.redis.get(quota_key(tid, "ai_interactions", month)) == b"5"
    # ai_interactions is now exhausted (5 of 5): the next request is refused on it
    r = await stack.client.get("/chat", headers={"X-API-Key": world.secrets["acme"]})
    assert r.status_code == 429 and r.json()["violated_policy"] == "quota:ai_interactions"


async def test_over_the_rate_is_429_naming_the_policy(world: World, upstream: Upstream) -> None:
    headers = {"X-API-Key": world.secrets["ratey"]}
    codes = [(await world.stack.client.get("/x", headers=headers)).status_code for _ in range(2)]
    assert codes == [200, 200]
    r = await world.stack.client.get("/x", headers=headers)
    assert r.status_code == 429
    assert r.headers["content-type"] == "application/problem+json"
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["ratelimit"].startswith('"tenant-rate";r=0')
    assert r.json()["violated_policy"] == "tenant-rate"
    assert "x-request-id" in r.headers
    assert upstream.hits == 2


async def test_quota_exhaustion_is_429_quota(world: World, upstream: Upstream) -> None:
    headers = {"X-API-Key": world.secrets["quotay"]}
    for _ in range(2):
        assert (await world.stack.client.get("/x", headers=headers)).status_code == 200
    r = await world.stack.client.get("/x", headers=headers)
    assert r.status_code == 429 and r.json()["violated_policy"] == "quota:api_calls"
    assert r.json()["type"].endswith("/quota-exceeded")


async def test_concurrency_lease_is_held_then_released(world: World, upstream: Upstream) -> None:
    client, headers = world.stack.client, {"X-API-Key": world.secrets["solo"]}
    slow = asyncio.create_task(client.get("/slow?sleep=0.8", headers=headers))
    await asyncio.wait_for(upstream.arrived.wait(), 5)
    r = await client.get("/x", headers=headers)
    assert r.status_code == 429 and r.json()["violated_policy"] == "concurrency"
    assert (await slow).status_code == 200
    for _ in range(50):  # the release is sent after the response, without waiting for it
        r = await client.get("/x", headers=headers)
        if r.status_code == 200:
            break
        await asyncio.sleep(0.02)
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("who", "status", "kind"),
    [("susp", 403, "tenant-suspended"), ("trial", 402, "trial-expired"),
     ("gone", 404, "tenant-not-found"), ("revoked", 401, "unauthenticated"),
     ("expired", 401, "unauthenticated")],
)
async def test_lifecycle_and_key_state_refusals(
    world: World, upstream: Upstream, who: str, status: int, kind: str
) -> None:
    r = await world.stack.client.get("/x", headers={"X-API-Key": world.secrets[who]})
    assert r.status_code == status
    assert r.json()["type"].endswith("/" + kind)
    assert "x-request-id" in r.headers
    assert upstream.hits == 0


async def test_no_credential_is_401_and_missing_scope_is_403(
    world: World, upstream: Upstream
) -> None:
    assert (await world.stack.client.get("/x")).status_code == 401
    r = await world.stack.client.get("/admin/users",
                                     headers={"X-API-Key": world.secrets["routed"]})
    # the key has "*", so the route rule passes; a narrower key is refused naming the scope
    assert r.status_code == 200
    _, narrow = keys.create(world.stack.cp, world.ids["routed"], actor="test", name="narrow",
                            scopes=["orders:read"])
    await _until_loaded(world.stack, world.ids["routed"], 2)
    r = await world.stack.client.get("/admin/users", headers={"X-API-Key": narrow})
    assert r.status_code == 403 and r.json()["scope"] == "admin:write"
    assert upstream.hits == 1


async def _until_loaded(stack: Stack, tenant_id: str, n_keys: int) -> None:
    for _ in range(100):
        snap = stack.gateway.refresher.snapshot
        if sum(k.tenant_id == tenant_id for k in snap.keys.values()) >= n_keys:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the snapshot never picked up the change")


async def test_request_ids_and_the_access_log(world: World, upstream: Upstream) -> None:
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(JsonFormatter().format(record))

    handler = Capture()
    access_log.addHandler(handler)
    try:
        headers = {"X-API-Key": world.secrets["acme"], "X-Request-Id": "abc-123"}
        r = await world.stack.client.get("/v2/things", headers=headers)
        assert r.headers["x-request-id"] == "abc-123"
        assert sent_headers(r)["x-request-id"] == "abc-123"
        bad = await world.stack.client.get("/v2/things", headers={
            "X-API-Key": world.secrets["acme"], "X-Request-Id": "no spaces\tallowed"})
        rid = bad.headers["x-request-id"]
        assert rid != "no spaces\tallowed" and len(rid) == 16
        assert sent_headers(bad)["x-request-id"] == rid
        refused = await world.stack.client.get("/v2/things")
    finally:
        access_log.removeHandler(handler)
    docs = [orjson.loads(line) for line in lines]
    assert [d["status"] for d in docs] == [200, 200, 401]
    assert docs[0]["request_id"] == "abc-123" and docs[0]["tenant_id"] == world.ids["acme"]
    assert docs[0]["route"] == "/v2/*" and docs[0]["upstream_ms"] > 0
    assert docs[2]["tenant_id"] is None and docs[2]["request_id"] == refused.headers["x-request-id"]


async def test_no_upstream_anywhere_is_503(sqlite_cp: ControlPlane, tmp_path: Any) -> None:
    plans.apply(sqlite_cp, {"plans": PLANS}, "test")
    _, secret = new_tenant(sqlite_cp, "nowhere", "roomy", None)
    async for stack in make_stack(sqlite_cp, tmp_path):
        r = await stack.client.get("/x", headers={"X-API-Key": secret})
        assert r.status_code == 503 and r.json()["type"].endswith("/no-upstream")


async def test_settings_upstream_is_the_fallback(
    sqlite_cp: ControlPlane, tmp_path: Any, upstream: Upstream
) -> None:
    plans.apply(sqlite_cp, {"plans": PLANS}, "test")
    _, secret = new_tenant(sqlite_cp, "fallback", "roomy", None)
    async for stack in make_stack(sqlite_cp, tmp_path, upstream=upstream.url):
        r = await stack.client.get("/x", headers={"X-API-Key": secret})
        assert r.status_code == 200 and upstream.hits == 1


async def test_upstream_down_is_502_and_counted(
    sqlite_cp: ControlPlane, tmp_path: Any
) -> None:
    plans.apply(sqlite_cp, {"plans": PLANS}, "test")
    _, secret = new_tenant(sqlite_cp, "dead", "roomy", "http://127.0.0.1:1")
    before = sample("tollway_gateway_upstream_errors_total", kind="connect")
    async for stack in make_stack(sqlite_cp, tmp_path):
        r = await stack.client.get("/x", headers={"X-API-Key": secret})
        assert r.status_code == 502 and "ratelimit-policy" in r.headers
    assert sample("tollway_gateway_upstream_errors_total", kind="connect") == before + 1


async def test_big_response_streams_through(world: World, upstream: Upstream) -> None:
    n = 3 * 1024 * 1024
    r = await world.stack.client.get(f"/dl?big={n}", headers={"X-API-Key": world.secrets["acme"]})
    assert r.status_code == 200 and len(r.content) == n
    await world.stack.gateway.emitter.flush()
    [event] = events(world.stack, world.ids["acme"])
    assert event.bytes_out == n


async def test_metrics_tenant_labels_are_an_allow_list(
    sqlite_cp: ControlPlane, tmp_path: Any, upstream: Upstream
) -> None:
    from gateway.observability import OTHER, TenantLabels

    plans.apply(sqlite_cp, {"plans": PLANS}, "test")
    plain, _ = new_tenant(sqlite_cp, "aaa", "roomy", upstream.url)
    flagged, _ = new_tenant(sqlite_cp, "zzz", "roomy", upstream.url,
                            settings={"features": {"metrics_label": True}})
    async for stack in make_stack(sqlite_cp, tmp_path):
        snapshot = stack.gateway.refresher.snapshot
        one = TenantLabels(limit=1)
        one.update(snapshot)
        assert one.label(flagged) == flagged and one.label(plain) == OTHER
        assert one.label(None) == "none"
        assert stack.gateway.labels.label(plain) == plain  # default allow-list holds 100


async def test_a_cancelled_request_still_returns_its_lease(
    world: World, upstream: Upstream
) -> None:
    client, headers = world.stack.client, {"X-API-Key": world.secrets["solo"]}
    slow = asyncio.create_task(client.get("/slow?sleep=5", headers=headers))
    await asyncio.wait_for(upstream.arrived.wait(), 5)
    slow.cancel()  # the client goes away; with ASGITransport the gateway call is cancelled
    with pytest.raises(asyncio.CancelledError):
        await slow
    for _ in range(50):
        r = await client.get("/x", headers=headers)
        if r.status_code == 200:
            break
        await asyncio.sleep(0.02)
    assert r.status_code == 200  # not held until the 60 s lease TTL
