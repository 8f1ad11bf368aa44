"""The public listener as served: dispatch between Tollway's own paths and the gateway, and
usage ingestion behind the gateway's tenant authentication."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from gateway.app import PublicApp, build_app
from tenancy import keys, plans, tenants
from tenancy.controlplane import ControlPlane
from tenancy.settings import Settings

BATCH = "application/cloudevents-batch+json"


@pytest.fixture
async def served(ch_settings: Settings, ch: Any) -> AsyncIterator[tuple[PublicApp, ControlPlane]]:
    from tenancy.store import migrate, open_engine

    engine = open_engine(ch_settings.effective_database_url)
    migrate(engine)
    engine.dispose()
    cp = ControlPlane.open(ch_settings)
    plans.ensure_defaults(cp)
    app = build_app(ch_settings, cp)
    async with app.control.router.lifespan_context(app.control):
        yield app, cp
    cp.close()


def _event(i: int, **kw: Any) -> dict[str, Any]:
    doc = {"specversion": "1.0", "id": f"ev-{i}", "source": "app://billing", "type": "tokens",
           "time": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
           "data": {"units": 10}}
    return {**doc, **kw}


async def test_ingestion_is_authenticated_by_the_tenant_key(
    served: tuple[PublicApp, ControlPlane], ch: Any
) -> None:
    app, cp = served
    a = tenants.create(cp, actor="t", name="Ingest Alpha", email="a@example.com")
    b = tenants.create(cp, actor="t", name="Ingest Beta", email="b@example.com")
    _r, secret = keys.create(cp, a["id"], actor="t")
    app.gateway.refresher.notify()
    for _ in range(100):  # the snapshot picks up the new key
        if any(k.tenant_id == a["id"] for k in app.gateway.refresher.snapshot.keys.values()):
            break
        await asyncio.sleep(0.05)
    body = orjson.dumps([_event(1), _event(2), _event(2), _event(3, type="no_such_meter")])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as c:
        anonymous = await c.post("/tollway/v1/events", content=body,
                                 headers={"content-type": BATCH})
        spoofed = await c.post("/tollway/v1/events", content=body, headers={
            "content-type": BATCH, "x-api-key": secret, "x-tenant-id": b["id"]})
        accepted = await c.post("/tollway/v1/events", content=body,
                                headers={"content-type": BATCH, "x-api-key": secret})
        health = await c.get("/healthz")
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"] == "application/problem+json"
    assert spoofed.status_code == 403
    assert accepted.status_code == 207, accepted.text
    doc = accepted.json()
    assert [r["status"] for r in doc["results"]] == ["accepted", "accepted", "duplicate",
                                                      "rejected"]
    assert health.status_code == 200
    rows = ch.query(
        "SELECT tenant_id, count() FROM usage_events WHERE source = 'api' GROUP BY tenant_id"
    ).result_rows
    assert rows == [(a["id"], 2)]  # nothing for B, nothing twice


async def test_own_paths_are_not_proxied(served: tuple[PublicApp, ControlPlane]) -> None:
    app, _cp = served
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as c:
        assert (await c.get("/readyz")).json()["checks"]["snapshot"] == "ok"
        assert (await c.get("/admin/v1/plans")).status_code == 401  # admin auth, not the proxy
        proxied = await c.get("/healthz/deeper")
    assert proxied.status_code == 401  # the gateway: no credential
    assert proxied.headers["x-request-id"]


def test_a_separate_admin_listener_keeps_the_store_out_of_gateway_readiness(
    sqlite_cp: ControlPlane,
) -> None:
    from dataclasses import replace

    # The gateway serves from its snapshot: a store outage must not unready every replica.
    public = build_app(replace(sqlite_cp.settings, admin_port=9999), sqlite_cp)
    assert set(public.state.ready_checks) == {"redis", "snapshot"}
    combined = build_app(sqlite_cp.settings, sqlite_cp)
    assert set(combined.state.ready_checks) == {"store", "redis", "snapshot"}
