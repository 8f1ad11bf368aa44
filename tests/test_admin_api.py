"""The admin API end to end over ASGI, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from gateway.app import build_admin_app, build_app
from tenancy import admin_api, admin_tokens, keys, plans
from tenancy.controlplane import ControlPlane
from tenancy.openapi import REQUEST_SCHEMAS, document
from tenancy.problems import PROBLEM_JSON


@pytest.fixture
async def client(cp: ControlPlane) -> AsyncIterator[httpx.AsyncClient]:
    plans.ensure_defaults(cp)
    _record, secret = admin_tokens.create(cp, actor="test", name="root", role="platform")
    app = build_app(cp.settings, cp)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test/admin/v1",
        headers={"Authorization": f"Bearer {secret}"},
    ) as c:
        yield c


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


async def _tenant(client: httpx.AsyncClient, name: str, **extra: Any) -> dict[str, Any]:
    response = await client.post("/tenants", json={"name": name, "email": f"{name}@example.com",
                                                   **extra})
    assert response.status_code == 201, response.text
    tenant: dict[str, Any] = response.json()
    return tenant


async def test_tenant_lifecycle_flow(client: httpx.AsyncClient) -> None:
    tenant = await _tenant(client, "acme", plan="professional", subdomain="acme")
    tid = tenant["id"]
    assert tenant["plan_id"] == "professional"

    got = await client.get(f"/tenants/{tid}")
    assert got.status_code == 200 and got.json()["name"] == "acme"

    patch = {"settings": {}, "metadata": {"crm": "42"}}
    patched = await client.patch(f"/tenants/{tid}", json=patch)
    assert patched.status_code == 200, patched.text
    assert patched.json()["metadata"] == {"crm": "42"}

    suspended = await client.post(f"/tenants/{tid}/suspend", json={"reason": "unpaid"})
    assert suspended.status_code == 200 and suspended.json()["status"] == "suspended"
    _problem(await client.post(f"/tenants/{tid}/suspend"), 409)
    reactivated = await client.post(f"/tenants/{tid}/reactivate")
    assert reactivated.json()["status"] == "active"

    moved = await client.put(f"/tenants/{tid}/plan", json={"plan": "enterprise"})
    assert moved.status_code == 200 and moved.json()["plan_id"] == "enterprise"
    _problem(await client.put(f"/tenants/{tid}/plan", json={"plan": "nope"}), 422)

    cancelled = await client.post(f"/tenants/{tid}/cancel")
    assert cancelled.json()["status"] == "cancelled"

    audit = await client.get("/audit", params={"tenant_id": tid})
    types = [e["type"] for e in audit.json()["items"]]
    assert types[0] == "tenant.cancelled" and "tenant.created" in types
    only = await client.get("/audit", params={"tenant_id": tid, "type": "tenant.suspended"})
    assert [e["type"] for e in only.json()["items"]] == ["tenant.suspended"]
    assert only.json()["items"][0]["at"].endswith("+00:00")

    first = (await client.get("/audit", params={"tenant_id": tid, "limit": 2})).json()
    second = (await client.get("/audit", params={"tenant_id": tid, "limit": 2,
                                                 "cursor": first["next_cursor"]})).json()
    pages = [e["seq"] for e in first["items"] + second["items"]]
    assert pages == sorted(pages, reverse=True) and len(set(pages)) == 4
    _problem(await client.get("/audit", params={"cursor": "abc"}), 422)


async def test_list_paginates_and_filters(client: httpx.AsyncClient) -> None:
    ids = [(await _tenant(client, f"team{i}", plan="starter" if i % 2 else "enterprise"))["id"]
           for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/tenants", params=params)).json()
        assert len(page["items"]) <= 2
        seen += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5

    starters = (await client.get("/tenants", params={"plan": "starter"})).json()["items"]
    assert {t["name"] for t in starters} == {"team1", "team3"}
    found = (await client.get("/tenants", params={"q": "TEAM4"})).json()["items"]
    assert [t["name"] for t in found] == ["team4"]
    _problem(await client.get("/tenants", params={"status": "bogus"}), 422)
    _problem(await client.get("/tenants", params={"limit": "x"}), 422)
    _problem(await client.get("/tenants", params={"cursor": "!!"}), 422)


async def test_keys_flow_secret_once(client: httpx.AsyncClient) -> None:
    tid = (await _tenant(client, "keys-co"))["id"]
    created = await client.post(f"/tenants/{tid}/keys", json={"name": "ci", "mode": "test"})
    assert created.status_code == 201, created.text
    key = created.json()
    assert key["secret"].startswith("tw_test_")

    listed = (await client.get(f"/tenants/{tid}/keys")).json()["items"]
    assert [k["id"] for k in listed] == [key["id"]]
    assert all("secret" not in k and "hash" not in k for k in listed)

    rotated = await client.post(f"/tenants/{tid}/keys/{key['id']}/rotate",
                                json={"overlap_seconds": 60})
    assert rotated.status_code == 201 and rotated.json()["secret"] != key["secret"]
    _problem(await client.post(f"/tenants/{tid}/keys/{key['id']}/rotate"), 409)

    revoked = await client.delete(f"/tenants/{tid}/keys/{rotated.json()['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    _problem(await client.delete(f"/tenants/{tid}/keys/nope"), 404)
    _problem(await client.post(f"/tenants/{tid}/keys", json={"mode": "prod"}), 422)


async def test_plans_apply_in_three_formats(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/plans")).json()["items"]
    assert {"starter", "professional", "enterprise"} <= {p["plan_id"] for p in listed}
    starter = (await client.get("/plans/starter")).json()
    assert starter["plan_id"] == "starter" and starter["version"] == 1
    _problem(await client.get("/plans/missing"), 404)

    toml = b"""
[plans.gold]
name = "Gold"
price = "99.00"
currency = "USD"

[plans.gold.limits]
rate_per_second = 50
burst = 100
concurrency = 10
fail_mode = "closed"
"""
    applied = await client.post("/plans", content=toml,
                                headers={"content-type": "application/toml"})
    assert applied.status_code == 200, applied.text
    assert applied.json()["plans"] == [{"plan_id": "gold", "version": 1, "created": True}]

    yaml_doc = (b"plans:\n  gold:\n    name: Gold\n    price: '99.00'\n    currency: USD\n"
                b"    limits: {rate_per_second: 60, burst: 100, concurrency: 10,\n"
                b"             fail_mode: closed}\n")
    again = await client.post("/plans", content=yaml_doc,
                              headers={"content-type": "application/yaml"})
    assert again.json()["plans"][0]["version"] == 2

    limits = {"rate_per_second": 60, "burst": 100, "concurrency": 10, "fail_mode": "closed"}
    json_doc = {"plans": {"gold": {"name": "Gold", "price": "99.00", "currency": "USD",
                                   "limits": limits}}}
    same = await client.post("/plans", json=json_doc)
    assert same.json()["plans"][0] == {"plan_id": "gold", "version": 2, "created": False}

    _problem(await client.post("/plans", content=b"x", headers={"content-type": "text/plain"}), 415)
    _problem(await client.post("/plans", content=b"[plans", headers={"content-type":
                                                                     "application/toml"}), 400)
    _problem(await client.post("/plans", json={"plans": {"Bad Id": {}}}), 422)


async def test_boundary_errors_are_problems(client: httpx.AsyncClient) -> None:
    body = _problem(await client.post("/tenants", json={"name": "x", "email": "x@example.com",
                                                        "colour": "red"}), 422)
    assert body["errors"][0]["field"] == "colour"
    assert _problem(await client.post("/tenants", json={"name": "x"}), 422)["errors"][0][
        "field"] == "email"
    _problem(await client.post("/tenants", json={"name": 5, "email": "x@example.com"}), 422)
    _problem(await client.post("/tenants", json=["not", "an", "object"]), 422)
    _problem(await client.post("/tenants", content=b"{nope",
                               headers={"content-type": "application/json"}), 400)
    _problem(await client.post("/tenants", content=b"name=x",
                               headers={"content-type": "application/x-www-form-urlencoded"}), 415)
    _problem(await client.get("/tenants/tn_missing"), 404)
    huge = {"name": "big", "email": "b@example.com", "metadata": {"x": "y" * (1 << 20)}}
    _problem(await client.post("/tenants", json=huge), 413)
    _problem(await client.get("/no-such-route"), 404)
    not_allowed = _problem(await client.delete("/tenants"), 405)
    assert not_allowed["title"] == "Method Not Allowed"
    await _tenant(client, "dup", subdomain="dup")
    _problem(await client.post("/tenants", json={"name": "dup2", "email": "d@example.com",
                                                 "subdomain": "dup"}), 409)


async def test_admin_tokens_and_tenant_scope(client: httpx.AsyncClient) -> None:
    tid = (await _tenant(client, "scoped"))["id"]
    made = await client.post("/admin-tokens", json={"name": "ops", "role": "tenant",
                                                    "tenant_id": tid})
    assert made.status_code == 201 and made.json()["secret"].startswith("twadm_")
    headers = {"Authorization": f"Bearer {made.json()['secret']}"}
    own = await client.get(f"/tenants/{tid}", headers=headers)
    assert own.status_code == 200
    patched = await client.patch(f"/tenants/{tid}", json={"settings": {}}, headers=headers)
    assert patched.status_code == 200, patched.text
    _problem(await client.patch(f"/tenants/{tid}", json={"name": "renamed"}, headers=headers), 403)
    platform_set = await client.patch(f"/tenants/{tid}", json={"settings": {"dunning_days": 14}})
    assert platform_set.json()["settings"] == {"dunning_days": 14}
    branded = await client.patch(f"/tenants/{tid}", headers=headers,
                                 json={"settings": {"branding": {"colour": "teal"}}})
    assert branded.json()["settings"] == {"branding": {"colour": "teal"}, "dunning_days": 14}
    refused = await client.patch(f"/tenants/{tid}", headers=headers,
                                 json={"settings": {"dunning_days": 90}})
    assert _problem(refused, 403)["errors"][0]["field"] == "settings.dunning_days"
    events = (await client.get("/audit", headers=headers)).json()["items"]
    assert events and {e["tenant_id"] for e in events} == {tid}
    _problem(await client.post("/admin-tokens", json={"name": "xyz", "role": "tenant"}), 422)
    listed = (await client.get("/admin-tokens")).json()["items"]
    assert {t["name"] for t in listed} == {"root", "ops"}
    revoked = await client.delete(f"/admin-tokens/{made.json()['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    _problem(await client.get(f"/tenants/{tid}", headers=headers), 401)
    root = next(t for t in listed if t["name"] == "root")
    _problem(await client.delete(f"/admin-tokens/{root['id']}"), 409)
    _problem(await client.delete("/admin-tokens/adm_missing"), 404)


async def test_unauthenticated_is_refused(client: httpx.AsyncClient) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Basic abc"},
                    {"Authorization": "Bearer twadm_" + "A" * 49}):
        response = await client.get("/tenants", headers=headers)
        _problem(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
    spec = await client.get("/openapi.json", headers={"Authorization": ""})
    assert spec.status_code == 200 and spec.json()["openapi"] == "3.1.0"


def _mounted_admin_routes(app: Starlette) -> set[tuple[str, str]]:
    mount = next(r for r in app.routes if isinstance(r, Mount) and r.path == admin_api.PREFIX)
    found = set()
    for route in mount.routes:
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":
                found.add((route.path, method.lower()))
    return found


def test_openapi_describes_every_mounted_route(cp: ControlPlane) -> None:
    spec = document()
    mounted = _mounted_admin_routes(build_app(cp.settings, cp))
    described = {(path, method) for path, item in spec["paths"].items() for method in item
                 if method != "parameters"}
    assert mounted == described
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            assert op["responses"], (path, method)
            for ref in [c["schema"]["$ref"] for c in op.get("requestBody", {})
                        .get("content", {}).values()]:
                assert ref.rsplit("/", 1)[1] in spec["components"]["schemas"]
    assert set(REQUEST_SCHEMAS) <= set(spec["components"]["schemas"])
    for path, item in spec["paths"].items():
        declared = {p["name"] for p in item.get("parameters", ()) if p["in"] == "path"}
        assert declared == set(re.findall(r"\{(\w+)\}", path)), path
    refs = re.findall(r'"#/components/schemas/(\w+)"', orjson.dumps(spec).decode())
    assert set(refs) <= set(spec["components"]["schemas"])


async def test_probes_metrics_and_a_gateway_not_started(cp: ControlPlane) -> None:
    app = build_app(cp.settings, cp)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as c:
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        ready = await c.get("/readyz")
        assert ready.status_code == 503  # no lifespan ran: the snapshot is not loaded
        assert ready.json()["checks"] == {"store": "ok", "redis": "ok", "snapshot": "not ready"}
        metrics = await c.get("/metrics")
        assert metrics.status_code == 200 and b"python_info" in metrics.content
        proxied = await c.post("/anything/else", content=b"x")
        assert _problem(proxied, 503)["detail"] == "the gateway is starting"


async def test_readyz_names_the_failing_store(cp: ControlPlane, tmp_path: Path) -> None:
    from tenancy.settings import load_settings

    broken = load_settings(env={}, data_dir=tmp_path, database_url=cp.settings.database_url,
                           redis_url="redis://127.0.0.1:1/0")
    plane = ControlPlane.open(broken)
    try:
        app = build_app(broken, plane)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test") as c:
            ready = await c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["store"] == "ok"
        assert ready.json()["checks"]["redis"].startswith("error")
    finally:
        plane.close()


async def test_separate_admin_listener(cp: ControlPlane) -> None:
    from dataclasses import replace

    settings = replace(cp.settings, admin_port=9999)
    _r, secret = admin_tokens.create(cp, actor="test", name="root", role="platform")
    public = build_app(settings, cp)
    admin = build_admin_app(settings, cp)
    headers = {"Authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=public),
                                 base_url="http://test") as c:
        _problem(await c.get("/admin/v1/plans", headers=headers), 503)  # proxied, not admin
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=admin),
                                 base_url="http://test") as c:
        assert (await c.get("/admin/v1/plans", headers=headers)).status_code == 200
        assert (await c.get("/healthz")).status_code == 200
        _problem(await c.get("/other"), 404)


async def test_unexpected_failure_is_a_bare_500(tmp_path: Path, redis_url: str) -> None:
    """A store without its schema makes every query fail: the client sees a 500 problem with
    no internals (no SQL, no table names), never a traceback."""
    from tenancy.settings import load_settings

    settings = load_settings(env={}, data_dir=tmp_path, redis_url=redis_url,
                             database_url=f"sqlite:///{tmp_path / 'unmigrated.db'}")
    plane = ControlPlane.open(settings)
    try:
        app = build_app(settings, plane)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            well_formed = keys.mint(admin_tokens.PREFIX)  # passes the format check: looked up
            response = await c.get("/admin/v1/plans",
                                   headers={"Authorization": f"Bearer {well_formed}"})
        body = _problem(response, 500)
        assert "table" not in response.text.lower() and "sql" not in response.text.lower()
        assert body["detail"] == "the request failed unexpectedly; the error was logged"
    finally:
        plane.close()


async def test_readyz_waits_for_the_snapshot(cp: ControlPlane) -> None:
    from gateway.health import snapshot_check
    from gateway.snapshot_refresher import SnapshotRefresher

    app = build_app(cp.settings, cp)
    refresher = SnapshotRefresher(cp.engine, cp.settings)
    app.state.ready_checks["snapshot"] = snapshot_check(refresher)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as c:
        before = await c.get("/readyz")
        assert before.status_code == 503 and before.json()["checks"]["snapshot"] == "not ready"
        await refresher.start()
        try:
            after = await c.get("/readyz")
            assert after.status_code == 200 and after.json()["checks"]["snapshot"] == "ok"
        finally:
            await refresher.close()
