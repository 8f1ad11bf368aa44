"""Hostile input through the whole gateway: tenant spoofing, hop-by-hop headers, oversized
requests. Two tenants with different upstreams, so a misroute would be visible as a request
arriving at the wrong server."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from prometheus_client import REGISTRY
from test_gateway_e2e import (
    PLANS,
    Stack,
    Upstream,
    events,
    make_stack,
    new_tenant,
    sent_headers,
)

from tenancy import plans
from tenancy.controlplane import ControlPlane

IDP_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ISSUER, AUDIENCE = "https://idp.bravo.example", "bravo-api"


def bravo_jwt(tenant_id: str) -> str:
    claims = {"tenant_id": tenant_id, "sub": "user-1", "iss": ISSUER, "aud": AUDIENCE,
              "exp": int(time.time()) + 300}
    return jwt.encode(claims, IDP_KEY, algorithm="RS256", headers={"kid": "b1"})


@dataclasses.dataclass
class Pair:
    stack: Stack
    up_a: Upstream
    up_b: Upstream
    a: str
    b: str
    key_a: str
    key_b: str


@pytest.fixture
async def pair(sqlite_cp: ControlPlane, tmp_path: Any) -> AsyncIterator[Pair]:
    up_a, up_b = Upstream(), Upstream()
    await up_a.start()
    await up_b.start()
    plans.apply(sqlite_cp, {"plans": PLANS}, "test")
    jwk = {**RSAAlgorithm.to_jwk(IDP_KEY.public_key(), as_dict=True), "kid": "b1"}
    a, key_a = new_tenant(sqlite_cp, "alpha", "roomy", up_a.url, subdomain="alpha",
                          domains=["api.alpha.example"])
    b, key_b = new_tenant(
        sqlite_cp, "bravo", "roomy", up_b.url, subdomain="bravo", domains=["api.bravo.example"],
        settings={"jwks": {"keys": [jwk]}, "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE},
    )
    try:
        async for stack in make_stack(sqlite_cp, tmp_path, max_body_bytes=1024):
            yield Pair(stack, up_a, up_b, a, b, key_a, key_b)
    finally:
        await up_a.close()
        await up_b.close()


def mismatches(source: str) -> float:
    return REGISTRY.get_sample_value("tollway_tenant_mismatch_total", {"source": source}) or 0.0


@pytest.mark.parametrize("case", ["header", "subdomain", "domain", "path", "path-label", "jwt"])
async def test_a_key_with_another_tenants_hint_is_403_and_reaches_no_upstream(
    pair: Pair, case: str
) -> None:
    headers = {"X-API-Key": pair.key_a}
    path = "/orders"
    if case == "header":
        headers["X-Tenant-ID"] = pair.b
    elif case == "subdomain":
        headers["Host"] = "bravo.localhost"
    elif case == "domain":
        headers["Host"] = "api.bravo.example"
    elif case == "path":
        path = f"/t/{pair.b}/orders"
    elif case == "path-label":
        path = "/t/bravo/orders"
    else:
        headers["Authorization"] = f"Bearer {bravo_jwt(pair.b)}"
    source = case.split("-")[0]
    before = mismatches(source)
    r = await pair.stack.client.get(path, headers=headers)
    assert r.status_code == 403, r.text
    assert r.json()["type"].endswith("/tenant-mismatch") and pair.b not in r.text
    assert mismatches(source) == before + 1
    assert pair.up_b.hits == 0 and pair.up_a.hits == 0
    # nothing was charged to either tenant
    assert not pair.stack.redis.keys("{t:*")


async def test_agreeing_hints_and_each_tenants_own_credentials_route_to_their_upstream(
    pair: Pair,
) -> None:
    client = pair.stack.client
    r = await client.get(f"/t/{pair.a}/orders", headers={
        "X-API-Key": pair.key_a, "Host": "alpha.localhost", "X-Tenant-ID": pair.a})
    assert r.status_code == 200 and r.json()["path"] == "/orders"
    r = await client.get("/orders", headers={"Authorization": f"Bearer {bravo_jwt(pair.b)}",
                                             "Host": "api.bravo.example"})
    assert r.status_code == 200
    assert sent_headers(r)["authorization"].startswith("Bearer ey")  # a JWT is the upstream's
    assert (pair.up_a.hits, pair.up_b.hits) == (1, 1)


async def test_hop_by_hop_headers_are_dropped_both_ways(pair: Pair) -> None:
    r = await pair.stack.client.get("/h?hop=1", headers={
        "X-API-Key": pair.key_a, "Connection": "X-Foo, keep-alive", "X-Foo": "secret",
        "Keep-Alive": "timeout=5", "TE": "trailers", "Upgrade": "h2c",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==", "X-Tollway-Tenant": "t=" + pair.b,
    })
    assert r.status_code == 200
    seen = sent_headers(r)
    for name in ("connection", "x-foo", "keep-alive", "te", "upgrade", "proxy-authorization",
                 "x-api-key"):
        assert name not in seen, name
    assert f"t={pair.a}," in seen["x-tollway-tenant"]
    assert "x-secret" not in r.headers and r.headers["x-public"] == "yes"


async def test_oversized_headers_are_431_before_anything_is_charged(pair: Pair) -> None:
    r = await pair.stack.client.get("/x", headers={"X-API-Key": pair.key_a, "X-Pad": "a" * 20000})
    assert r.status_code == 431 and "x-request-id" in r.headers
    assert pair.up_a.hits == 0 and not pair.stack.redis.keys("{t:*")


async def test_oversized_body_is_413_before_anything_is_charged(pair: Pair) -> None:
    r = await pair.stack.client.post("/x", content=b"x" * 4096,
                                     headers={"X-API-Key": pair.key_a})
    assert r.status_code == 413
    assert pair.up_a.hits == 0 and not pair.stack.redis.keys("{t:*")


@pytest.mark.parametrize("path", ["/a/%2e%2e/admin", "/a%2Fb", "/a\\b"])
async def test_ambiguous_paths_are_400_and_reach_no_upstream(pair: Pair, path: str) -> None:
    r = await pair.stack.client.get("http://gw.test" + path, headers={"X-API-Key": pair.key_a})
    assert r.status_code == 400, (path, r.status_code)
    assert pair.up_a.hits == 0


async def test_literal_dot_segments_are_400(pair: Pair) -> None:
    """httpx normalises `..` away before sending, so this one goes in as a raw ASGI scope."""
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "GET", "scheme": "http", "path": "/b",
        "raw_path": b"/a/../b", "query_string": b"", "client": ("127.0.0.1", 9),
        "headers": [(b"host", b"gw.test"), (b"x-api-key", pair.key_a.encode())],
    }
    await pair.stack.gateway(scope, receive, send)
    assert sent[0]["status"] == 400 and pair.up_a.hits == 0


async def test_two_credentials_for_different_tenants_are_refused(pair: Pair) -> None:
    r = await pair.stack.client.get("/x", headers={
        "X-API-Key": pair.key_a, "Authorization": f"Bearer {pair.key_b}"})
    assert r.status_code == 400
    assert pair.up_a.hits == 0 and pair.up_b.hits == 0


async def test_invented_first_segments_cannot_mint_unbounded_route_templates(pair: Pair) -> None:
    from gateway.routing import ANY, MAX_TEMPLATES

    client = pair.stack.client
    for i in range(MAX_TEMPLATES + 5):
        r = await client.get(f"/seg{i}/123", headers={"X-API-Key": pair.key_a})
        assert r.status_code == 200
    r = await client.get("/9999/x", headers={"X-API-Key": pair.key_a})  # not a word
    await pair.stack.gateway.emitter.flush()
    routes = [e.route for e in events(pair.stack, pair.a)]
    assert len(routes) == MAX_TEMPLATES + 6
    assert len(set(routes)) == MAX_TEMPLATES + 1
    assert routes[:2] == ["/seg0/*", "/seg1/*"] and routes[-6:] == [ANY] * 6
    # another tenant's budget is its own
    snapshot = pair.stack.gateway.refresher.snapshot
    assert pair.stack.gateway.routing.template(snapshot.tenants[pair.b], "/seg99/1") == "/seg99/*"
