"""Tenant resolution under attack: spoofed hints, hostile Host headers and path tricks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import RSAAlgorithm
from prometheus_client import REGISTRY
from sqlalchemy import update

from gateway.jwt_auth import JwtVerifier
from gateway.resolution import Resolved, Resolver, check_scopes
from gateway.snapshot import RouteRule, Snapshot, load_snapshot
from tenancy import keys, plans, tenants
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem
from tenancy.settings import Settings, load_settings
from tenancy.tables import tenants as tenants_table

ISS, AUD = "https://idp.example", "tollway-api"
SIGNERS = {name: rsa.generate_private_key(public_exponent=65537, key_size=2048) for name in "ab"}


@dataclass
class World:
    cp: ControlPlane
    snapshot: Snapshot
    a: str
    b: str
    key_a: str  # scopes: orders:read
    admin_a: str  # scopes: *
    key_b: str
    jwt_a: str
    jwt_b: str
    settings: Settings
    resolver: Resolver

    async def resolve(self, scope: dict[str, Any], now: float | None = None) -> Resolved:
        return await self.resolver.resolve(scope, self.snapshot, now)

    async def refused(self, scope: dict[str, Any], status: int) -> Problem:
        with pytest.raises(Problem) as caught:
            await self.resolve(scope)
        assert caught.value.status == status, caught.value.detail
        return caught.value


def token(tenant_id: str, signer: str) -> str:
    payload = {
        "iss": ISS, "aud": AUD, "sub": f"user-of-{tenant_id}", "exp": int(time.time()) + 3600,
        "tenant_id": tenant_id, "scope": "orders:read",
    }
    return jwt.encode(payload, SIGNERS[signer], algorithm="RS256", headers={"kid": signer})


def onboard(cp: ControlPlane, name: str, label: str, gateway_settings: dict[str, Any]) -> str:
    plans.ensure_defaults(cp)
    tenant_id = str(tenants.create(
        cp, actor="test", name=name, email="ops@example.com", subdomain=label,
        domains=[f"api.{label}.example"],
    )["id"])
    with cp.transaction("test") as tx:
        where = tenants_table.c.id == tenant_id
        tx.conn.execute(update(tenants_table).where(where).values(settings=gateway_settings))
        tx.audit("tenant.settings_changed", tenant_id, tenant_id=tenant_id, after=gateway_settings)
    return tenant_id


def jwks(signer: str) -> dict[str, Any]:
    doc = RSAAlgorithm.to_jwk(SIGNERS[signer].public_key(), as_dict=True)
    return {"keys": [{**doc, "kid": signer}]}


def make_resolver(**overrides: Any) -> tuple[Settings, Resolver]:
    conf = load_settings(
        env={}, base_domains=("tollway.test",), jwt_issuer=ISS, jwt_audience=AUD, **overrides
    )
    return conf, Resolver(conf, JwtVerifier(conf))


@pytest.fixture
def world(sqlite_cp: ControlPlane) -> World:
    routes = [{"prefix": "/admin", "scopes": ["admin:write"]}]
    a = onboard(sqlite_cp, "Alpha", "alpha", {"jwks": jwks("a"), "routes": routes})
    b = onboard(sqlite_cp, "Beta", "beta", {"jwks": jwks("b")})
    _, key_a = keys.create(sqlite_cp, a, actor="test", scopes=["orders:read"])
    _, admin_a = keys.create(sqlite_cp, a, actor="test")
    _, key_b = keys.create(sqlite_cp, b, actor="test")
    conf, resolver = make_resolver()
    return World(
        cp=sqlite_cp, snapshot=load_snapshot(sqlite_cp.engine), a=a, b=b, key_a=key_a,
        admin_a=admin_a, key_b=key_b, jwt_a=token(a, "a"), jwt_b=token(b, "b"), settings=conf,
        resolver=resolver,
    )


def request(
    path: str = "/v1/orders", headers: list[tuple[str, str]] | None = None,
    raw: list[tuple[bytes, bytes]] | None = None, raw_path: bytes | None = None,
) -> dict[str, Any]:
    encoded = [(k.lower().encode(), v.encode()) for k, v in headers or []]
    rp = raw_path if raw_path is not None else path.encode()
    return {
        "type": "http", "method": "GET", "scheme": "http", "http_version": "1.1",
        "path": unquote(rp.decode("latin-1")), "raw_path": rp, "query_string": b"",
        "headers": encoded + (raw or []),
    }


def mismatches(source: str) -> float:
    return REGISTRY.get_sample_value("tollway_tenant_mismatch_total", {"source": source}) or 0.0


# --- the credential decides -----------------------------------------------------------


async def test_a_key_resolves_its_tenant_and_agreeing_hints_pass(world: World) -> None:
    for credential in (("Authorization", f"Bearer {world.key_a}"), ("X-API-Key", world.key_a)):
        got = await world.resolve(request(headers=[credential]))
        assert got.tenant.id == world.a and got.key is not None and got.principal is None
        assert got.scopes == {"orders:read"} and got.subject == got.key.id
        assert (got.path, got.raw_path) == ("/v1/orders", b"/v1/orders")
    hints = [
        ("Host", "alpha.tollway.test"), ("Host", "ALPHA.Tollway.Test.:8443"),
        ("Host", "api.alpha.example"), ("Host", "tollway.test"), ("Host", "10.0.0.7:8080"),
        ("Host", "[::1]:8080"), ("X-Tenant-ID", world.a),
    ]
    for hint in hints:
        got = await world.resolve(request(headers=[("X-API-Key", world.key_a), hint]))
        assert got.tenant.id == world.a, hint


@pytest.mark.parametrize("segment", ["{a}", "alpha", "ALPHA", "%61lpha"])
async def test_path_prefix_naming_the_credentials_tenant_is_stripped(
    world: World, segment: str
) -> None:
    prefix = "/t/" + segment.format(a=world.a)
    got = await world.resolve(
        request(prefix + "/v1/%6Frders", headers=[("X-API-Key", world.key_a)])
    )
    assert got.tenant.id == world.a
    assert (got.path, got.raw_path) == ("/v1/orders", b"/v1/%6Frders")
    bare = await world.resolve(request(prefix, headers=[("X-API-Key", world.key_a)]))
    assert (bare.path, bare.raw_path) == ("/", b"/")


async def test_a_jwt_resolves_the_tenant_in_its_claim(world: World) -> None:
    got = await world.resolve(request(headers=[("Authorization", f"Bearer {world.jwt_b}")]))
    assert got.tenant.id == world.b and got.key is None and got.principal is not None
    assert got.subject == f"user-of-{world.b}" and got.scopes == {"orders:read"}
    both = await world.resolve(request(headers=[
        ("Authorization", f"Bearer {world.jwt_b}"), ("X-API-Key", world.key_b),
    ]))
    assert both.tenant.id == world.b and both.key is not None and both.principal is not None


# --- the spoofing matrix -----------------------------------------------------------------


Spoof = tuple[str, Callable[[World], dict[str, Any]]]
SPOOFS: dict[str, Spoof] = {
    "B's X-Tenant-ID": ("header", lambda w: request(headers=[("X-Tenant-ID", w.b)])),
    "unknown X-Tenant-ID": ("header", lambda w: request(headers=[("X-Tenant-ID", "nobody")])),
    "B's subdomain": ("subdomain", lambda w: request(headers=[("Host", "beta.tollway.test")])),
    "B's subdomain, loud": (
        "subdomain", lambda w: request(headers=[("Host", "BETA.TOLLWAY.TEST.:443")]),
    ),
    "unknown subdomain": (
        "subdomain", lambda w: request(headers=[("Host", "nobody.tollway.test")]),
    ),
    "B's custom domain": ("domain", lambda w: request(headers=[("Host", "api.beta.example")])),
    "B's id in the path": ("path", lambda w: request(f"/t/{w.b}/v1/orders")),
    "B's label in the path": ("path", lambda w: request("/t/beta/v1/orders")),
    "B's label, encoded": ("path", lambda w: request("/t/%62eta/v1/orders")),
    "B after collapsing //": ("path", lambda w: request("//t//beta//v1")),
    "unknown tenant in the path": ("path", lambda w: request("/t/nobody/v1")),
    "empty tenant in the path": ("path", lambda w: request("/t/")),
    "B's JWT next to A's key": (
        "jwt", lambda w: request(headers=[("Authorization", f"Bearer {w.jwt_b}")]),
    ),
}


@pytest.mark.parametrize("case", sorted(SPOOFS))
async def test_a_hint_naming_another_tenant_is_refused_and_counted(
    world: World, case: str
) -> None:
    source, build = SPOOFS[case]
    scope = build(world)
    scope["headers"].append((b"x-api-key", world.key_a.encode()))
    before = mismatches(source)
    problem = await world.refused(scope, 403)
    assert problem.kind == "tenant-mismatch" and problem.body()["source"] == source
    assert world.b not in problem.detail
    assert mismatches(source) == before + 1


async def test_without_a_credential_hints_alone_resolve_nothing(world: World) -> None:
    for hints in (
        [("X-Tenant-ID", world.a)],
        [("Host", "alpha.tollway.test")],
        [("Host", "api.alpha.example")],
    ):
        problem = await world.refused(request(headers=hints), 401)
        assert problem.headers["WWW-Authenticate"].startswith("Bearer")
    await world.refused(request(f"/t/{world.a}/v1"), 401)


async def test_bad_revoked_and_expired_keys_are_401(world: World) -> None:
    forged = keys.mint("tw_live_")  # well-formed, checksum valid, never issued
    for secret in ("tw_live_short", world.key_a[:-1] + "x", forged, "nope"):
        await world.refused(request(headers=[("X-API-Key", secret)]), 401)
    await world.refused(request(headers=[("Authorization", f"Basic {world.key_a}")]), 401)
    await world.refused(request(headers=[("Authorization", "Bearer ")]), 401)

    record, expiring = keys.create(
        world.cp, world.a, actor="test", expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    revoked = world.snapshot.keys[keys.hash_secret(world.key_a)].id
    keys.revoke(world.cp, revoked, actor="test")
    world.snapshot = load_snapshot(world.cp.engine)
    await world.refused(request(headers=[("X-API-Key", world.key_a)]), 401)  # revoked
    scope = request(headers=[("X-API-Key", expiring)])
    assert (await world.resolve(scope)).key.id == record["id"]  # type: ignore[union-attr]
    with pytest.raises(Problem) as caught:
        await world.resolve(scope, now=time.time() + 7200)
    assert caught.value.status == 401


async def test_two_api_keys_at_once_are_refused(world: World) -> None:
    both = [("Authorization", f"Bearer {world.key_a}"), ("X-API-Key", world.admin_a)]
    await world.refused(request(headers=both), 400)


# --- hostile headers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        b"", b"a b", b"evil.example/x", b"user@alpha.tollway.test", b"alpha.tollway.test:99999",
        b"alpha.tollway.test:", b"alpha.tollway.test:x", b"alpha.tollway.test..",
        b".", b"al%70ha.tollway.test", b"alpha.tollway.test\r\nX: y", b"\xce\xb1.tollway.test",
        b"[zz]", b"alpha.tollway.test:80:80", b"http://alpha.tollway.test",
    ],
)
async def test_garbage_host_headers_are_400(world: World, host: bytes) -> None:
    scope = request(headers=[("X-API-Key", world.key_a)], raw=[(b"host", host)])
    await world.refused(scope, 400)


@pytest.mark.parametrize("name", [b"host", b"authorization", b"x-api-key", b"x-tenant-id"])
async def test_duplicate_headers_are_400(world: World, name: bytes) -> None:
    values = {
        b"host": b"alpha.tollway.test", b"authorization": f"Bearer {world.key_a}".encode(),
        b"x-api-key": world.key_a.encode(), b"x-tenant-id": world.a.encode(),
    }
    scope = request(raw=[(name, values[name]), (name, values[name])])
    if name not in (b"authorization", b"x-api-key"):
        scope["headers"].append((b"x-api-key", world.key_a.encode()))
    await world.refused(scope, 400)


# --- hostile paths -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw_path",
    [
        b"http://beta.tollway.test/v1", b"*", b"beta.tollway.test/v1", b"",
        b"/t/../t/beta/v1", b"/t/%2e%2e/t/beta/v1", b"/t/alpha/%2E%2E/%2e%2e/t/beta",
        b"/t/alpha/..%2ft/beta", b"/t/alpha%2F..%2Ft%2Fbeta/v1", b"/v1/%5c..%5cadmin",
        b"/v1\\..\\admin", b"/v1/./orders", b"/v1/orders/..", b"/v1/%zz", b"/v1/%",
        b"/v1/%00", b"/v1/%0a", b"/v1/%ff", b"/v1/\xc3\xa9", b"/v1/a b", b"/v1/\x7f",
    ],
)
async def test_ambiguous_paths_are_400(world: World, raw_path: bytes) -> None:
    await world.refused(request(headers=[("X-API-Key", world.key_a)], raw_path=raw_path), 400)


@pytest.mark.parametrize(
    ("raw_path", "path", "forwarded"),
    [
        (b"//v1//orders", "/v1/orders", b"/v1/orders"),
        (b"/v1/orders/", "/v1/orders/", b"/v1/orders/"),
        (b"//v1///orders//", "/v1/orders/", b"/v1/orders/"),
        (b"/", "/", b"/"),
        (b"//", "/", b"/"),
        (b"/v1/caf%C3%A9", "/v1/café", b"/v1/caf%C3%A9"),
        (b"/v1/.well-known/x", "/v1/.well-known/x", b"/v1/.well-known/x"),
        (b"/v1/orders?t=/t/beta", "/v1/orders", b"/v1/orders"),
    ],
)
async def test_harmless_paths_are_normalised(
    world: World, raw_path: bytes, path: str, forwarded: bytes
) -> None:
    got = await world.resolve(request(headers=[("X-API-Key", world.key_a)], raw_path=raw_path))
    assert (got.path, got.raw_path) == (path, forwarded)


# --- scopes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/admin", False), ("/admin/users", False), ("/%61dmin/users", False),
        ("/t/alpha/admin", False), ("//admin//x", False), ("/administrator", True),
        ("/v1/admin", True),
    ],
)
async def test_route_scopes_are_enforced_on_the_decoded_path(
    world: World, path: str, allowed: bool
) -> None:
    limited = request(path, headers=[("X-API-Key", world.key_a)])
    if allowed:
        await world.resolve(limited)
    else:
        problem = await world.refused(limited, 403)
        assert problem.kind == "insufficient-scope" and problem.body()["scope"] == "admin:write"
        assert "admin:write" in problem.headers["WWW-Authenticate"]
    await world.resolve(request(path, headers=[("X-API-Key", world.admin_a)]))


def test_scope_check_is_a_pure_function() -> None:
    rules = (RouteRule("/admin", ("admin:read", "admin:write")), RouteRule("/", ("any:call",)))
    check_scopes(frozenset({"*"}), "/admin/x", rules)
    check_scopes(frozenset({"admin:read", "admin:write", "any:call"}), "/admin", rules)
    check_scopes(frozenset(), "/x", ())
    for granted, path, missing in (
        ({"admin:read", "any:call"}, "/admin", "admin:write"),
        ({"admin:read", "admin:write"}, "/admin/x", "any:call"),
        (set(), "/anything", "any:call"),
    ):
        with pytest.raises(Problem) as caught:
            check_scopes(frozenset(granted), path, rules)
        assert caught.value.status == 403 and caught.value.body()["scope"] == missing


# --- configuration -----------------------------------------------------------------------


async def test_disabled_sources_are_not_consulted(world: World) -> None:
    _, keys_only = make_resolver(tenant_sources=("key",))
    scope = request(
        f"/t/{world.b}/v1", headers=[("X-API-Key", world.key_a), ("X-Tenant-ID", world.b),
                                     ("Host", "beta.tollway.test")],
    )
    got = await keys_only.resolve(scope, world.snapshot)
    assert got.tenant.id == world.a and got.path == f"/t/{world.b}/v1"
    with pytest.raises(Problem) as caught:
        await keys_only.resolve(
            request(headers=[("Authorization", f"Bearer {world.jwt_a}")]), world.snapshot
        )
    assert caught.value.status == 401
    _, jwt_only = make_resolver(tenant_sources=("jwt",))
    with pytest.raises(Problem) as caught:
        await jwt_only.resolve(request(headers=[("X-API-Key", world.key_a)]), world.snapshot)
    assert caught.value.status == 401


def test_unknown_sources_are_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="tenant_sources"):
        make_resolver(tenant_sources=("key", "cookie"))


# --- the property ------------------------------------------------------------------------


def test_resolved_tenant_is_always_the_credentials_or_the_request_is_refused(
    world: World,
) -> None:
    credentials = {
        "none": ([], None),
        "key A": ([("X-API-Key", world.key_a)], world.a),
        "key B": ([("Authorization", f"Bearer {world.key_b}")], world.b),
        "jwt A": ([("Authorization", f"Bearer {world.jwt_a}")], world.a),
        "jwt B": ([("Authorization", f"Bearer {world.jwt_b}")], world.b),
        "key A + jwt A": (
            [("X-API-Key", world.admin_a), ("Authorization", f"Bearer {world.jwt_a}")], world.a,
        ),
        "key A + jwt B": (
            [("X-API-Key", world.key_a), ("Authorization", f"Bearer {world.jwt_b}")], None,
        ),
        "jwt B signed by A": ([("Authorization", f"Bearer {token(world.b, 'a')}")], None),
        "garbage": ([("X-API-Key", "tw_live_garbage")], None),
    }
    hosts = {
        "alpha.tollway.test": world.a, "beta.tollway.test": world.b,
        "api.alpha.example": world.a, "api.beta.example": world.b, "nobody.tollway.test": "?",
        "tollway.test": None, "gateway.internal:8080": None,
    }
    paths = {
        "/v1/x": None, f"/t/{world.a}/x": world.a, f"/t/{world.b}/x": world.b,
        "/t/alpha/x": world.a, "/t/BETA/x": world.b, "/t/nobody/x": "?",
    }
    header_values = {world.a: world.a, world.b: world.b, "nobody": "?"}

    @settings(max_examples=150, deadline=None)
    @given(
        credential=st.sampled_from(sorted(credentials)),
        host=st.one_of(st.none(), st.sampled_from(sorted(hosts))),
        path=st.sampled_from(sorted(paths)),
        header=st.one_of(st.none(), st.sampled_from(sorted(header_values))),
        order=st.randoms(use_true_random=False),
    )
    def check(credential: str, host: str | None, path: str, header: str | None, order: Any) -> None:
        headers, owner = credentials[credential]
        hints = {paths[path]}
        extra = list(headers)
        if host is not None:
            extra.append(("Host", host))
            hints.add(hosts[host])
        if header is not None:
            extra.append(("X-Tenant-ID", header))
            hints.add(header_values[header])
        order.shuffle(extra)
        hints.discard(None)
        try:
            got = asyncio.run(world.resolve(request(path, headers=extra)))
        except Problem as problem:
            assert problem.status in (400, 401, 403)
            if owner is not None and hints <= {owner}:
                pytest.fail(f"refused a consistent request: {problem.detail}")
            return
        assert owner is not None, "resolved without a valid credential"
        assert got.tenant.id == owner
        assert hints <= {owner}, "served despite a hint naming another tenant"

    check()
