"""A tenant admin of A can reach nothing of B: every admin route, from the route table, with
B's ids, answers 403 or 404 and changes nothing. Wrong kinds of credentials are refused."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from gateway.app import build_app
from tenancy import admin_api, admin_tokens, keys, plans, tenants
from tenancy.controlplane import ControlPlane
from tenancy.openapi import REQUEST_SCHEMAS, document

# Routes a tenant admin may use that address no tenant: the shared plan catalogue.
SHARED_READS = {("GET", "/plans"), ("GET", "/plans/{plan_id}")}
SAMPLES = {"string": "sample-value", "integer": 1, "boolean": True, "object": {}, "array": []}


def _sample_body(schema_name: str, tenant_b: str) -> dict[str, Any]:
    """A schema-valid body, so that a refusal cannot come from validation instead of authz."""
    schema = REQUEST_SCHEMAS[schema_name]
    body: dict[str, Any] = {}
    for name in schema.get("required", ()):
        prop = schema["properties"][name]
        kind = prop["type"] if isinstance(prop["type"], str) else prop["type"][0]
        body[name] = prop["enum"][-1] if "enum" in prop else SAMPLES[kind]
    if schema_name == "TenantCreate":
        body["email"] = "mallory@example.com"
    if schema_name == "AdminTokenCreate":
        body["tenant_id"] = tenant_b
    if schema_name == "PlanChange":
        body["plan"] = "enterprise"
    return body


def _request_schema(path: str, method: str) -> str | None:
    op = document()["paths"][path][method.lower()]
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" not in content:
        return None
    ref: str = content["application/json"]["schema"]["$ref"]
    name = ref.rsplit("/", 1)[1]
    return name if name in REQUEST_SCHEMAS else None


@pytest.fixture
def world(sqlite_cp: ControlPlane) -> dict[str, Any]:
    cp = sqlite_cp
    plans.ensure_defaults(cp)
    a = tenants.create(cp, actor="test", name="tenant-a", email="a@example.com")
    b = tenants.create(cp, actor="test", name="tenant-b", email="b@example.com")
    key_b, _ = keys.create(cp, b["id"], actor="test", name="b-key")
    _, key_a_secret = keys.create(cp, a["id"], actor="test", name="a-key")
    _, admin_a = admin_tokens.create(cp, actor="test", name="a-admin", role="tenant",
                                     tenant_id=a["id"])
    _, platform = admin_tokens.create(cp, actor="test", name="root", role="platform")
    token_b, _ = admin_tokens.create(cp, actor="test", name="b-admin", role="tenant",
                                     tenant_id=b["id"])
    return {"cp": cp, "a": a, "b": b, "key_b": key_b, "admin_a": admin_a, "token_b": token_b,
            "key_a_secret": key_a_secret, "platform": platform}


@pytest.fixture
async def client(world: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(world["cp"].settings, world["cp"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test/admin/v1") as c:
        yield c


def _routes(app: Starlette) -> list[tuple[str, str]]:
    """Every mounted admin route, other packages' included, so a new one is covered here."""
    mount = next(r for r in app.routes if isinstance(r, Mount) and r.path == admin_api.PREFIX)
    found = []
    for route in mount.routes:
        assert isinstance(route, Route)
        for method in sorted(route.methods or ()):
            if method != "HEAD" and route.path != "/openapi.json":
                found.append((method, route.path))
    return found


async def test_tenant_admin_reaches_nothing_of_another_tenant(
    world: dict[str, Any], client: httpx.AsyncClient
) -> None:
    b, key_b = world["b"], world["key_b"]
    ids = {"tenant_id": b["id"], "key_id": key_b["id"], "plan_id": "starter",
           "token_id": world["token_b"]["id"]}
    headers = {"Authorization": f"Bearer {world['admin_a']}"}
    checked = 0
    app = build_app(world["cp"].settings, world["cp"])
    routes = _routes(app)
    assert ("GET", "/tenants/{tenant_id}/usage") in routes
    for method, template in routes:
        if (method, template) in SHARED_READS:
            continue
        path = re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], template)
        schema = _request_schema(template, method)
        kwargs: dict[str, Any] = {"headers": headers, "params": {"tenant_id": b["id"]}}
        if schema is not None:
            kwargs["json"] = _sample_body(schema, b["id"])
        elif method in {"POST", "PUT", "PATCH"}:
            kwargs["json"] = {"plans": {}}
        response = await client.request(method, path, **kwargs)
        assert response.status_code in (403, 404), (method, path, response.status_code,
                                                    response.text)
        if "{tenant_id}" in template or template == "/audit":
            assert response.status_code == 404, (method, path)
        checked += 1
    assert checked == len(routes) - len(SHARED_READS)

    cp: ControlPlane = world["cp"]
    with cp.engine.connect() as conn:
        after_b = tenants.get(conn, b["id"])
        assert after_b["status"] == b["status"] and after_b["plan_id"] == b["plan_id"]
        assert [k["revoked_at"] for k in keys.list_keys(conn, b["id"])] == [None]
        tokens_b = [t for t in admin_tokens.list_tokens(conn) if t["tenant_id"] == b["id"]]
        assert [t["revoked_at"] for t in tokens_b] == [None]


async def test_tenant_admin_audit_shows_only_its_tenant(
    world: dict[str, Any], client: httpx.AsyncClient
) -> None:
    headers = {"Authorization": f"Bearer {world['admin_a']}"}
    events = (await client.get("/audit", headers=headers)).json()["items"]
    assert events and {e["tenant_id"] for e in events} == {world["a"]["id"]}


async def test_platform_token_reaches_the_same_resources(
    world: dict[str, Any], client: httpx.AsyncClient
) -> None:
    headers = {"Authorization": f"Bearer {world['platform']}"}
    b = world["b"]
    assert (await client.get(f"/tenants/{b['id']}", headers=headers)).status_code == 200
    assert (await client.get(f"/tenants/{b['id']}/keys", headers=headers)).status_code == 200


async def test_tenant_api_key_is_refused(world: dict[str, Any], client: httpx.AsyncClient) -> None:
    response = await client.get(f"/tenants/{world['a']['id']}",
                                headers={"Authorization": f"Bearer {world['key_a_secret']}"})
    assert response.status_code == 401
    assert "API keys are not accepted" in response.json()["detail"]


async def test_revoked_and_expired_admin_tokens_are_refused(
    world: dict[str, Any], client: httpx.AsyncClient
) -> None:
    cp: ControlPlane = world["cp"]
    a_id = world["a"]["id"]
    record, revoked = admin_tokens.create(cp, actor="test", name="gone", role="tenant",
                                          tenant_id=a_id)
    ok = await client.get(f"/tenants/{a_id}", headers={"Authorization": f"Bearer {revoked}"})
    assert ok.status_code == 200
    admin_tokens.revoke(cp, record["id"], actor="test")
    refused = await client.get(f"/tenants/{a_id}", headers={"Authorization": f"Bearer {revoked}"})
    assert refused.status_code == 401

    past = datetime.now(UTC) - timedelta(days=2)
    _, expired = admin_tokens.create(cp, actor="test", name="old", role="tenant", tenant_id=a_id,
                                     expires_at=past + timedelta(days=1), now=past)
    response = await client.get(f"/tenants/{a_id}", headers={"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401
