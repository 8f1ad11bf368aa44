"""JWT verification against JWKS served by a real local HTTP server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm
from sqlalchemy import update

from gateway.jwt_auth import JwtVerifier, check_algorithms
from gateway.snapshot import Snapshot, load_snapshot
from tenancy import plans, tenants
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem
from tenancy.settings import Settings, load_settings
from tenancy.tables import tenants as tenants_table

ISS = "https://idp.example"
AUD = "tollway-api"
RSA_1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_1 = ec.generate_private_key(ec.SECP256R1())


def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    doc: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**doc, "kid": kid, "use": "sig"}


@dataclass
class JwksServer:
    base: str
    docs: dict[str, dict[str, Any]]
    hits: Counter[str] = field(default_factory=Counter)


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer(base="", docs={})

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        server.hits[name] += 1
        if name not in server.docs:
            return web.Response(status=404)
        return web.Response(body=orjson.dumps(server.docs[name]), content_type="application/json")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.base = f"http://{host}:{port}"
    yield server
    await runner.cleanup()


def onboard(cp: ControlPlane, name: str, settings: dict[str, Any] | None = None) -> str:
    plans.ensure_defaults(cp)
    tenant_id = str(tenants.create(cp, actor="test", name=name, email="ops@example.com")["id"])
    if settings:
        with cp.transaction("test") as tx:
            row = tenants_table.c.id == tenant_id
            tx.conn.execute(update(tenants_table).where(row).values(settings=settings))
            tx.audit("tenant.settings_changed", tenant_id, tenant_id=tenant_id, after=settings)
    return tenant_id


def jwt_settings(**kw: Any) -> Settings:
    return load_settings(env={}, jwt_issuer=ISS, jwt_audience=AUD, **kw)


def claims(tenant: str, **overrides: Any) -> dict[str, Any]:
    doc = {
        "iss": ISS, "aud": AUD, "sub": "user-1", "exp": int(time.time()) + 300,
        "tenant_id": tenant, "scope": "orders:read orders:write",
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not None}


def sign(
    payload: dict[str, Any], key: Any = RSA_1, kid: str | None = "k1", alg: str = "RS256"
) -> str:
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def forge(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A token built by hand, for algorithms PyJWT rightly refuses to produce."""
    signing_input = b64(orjson.dumps(header)) + b"." + b64(orjson.dumps(payload))
    signature = b"" if secret is None else hmac.new(secret, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(signature)).decode()


async def rejected(verifier: JwtVerifier, token: str, snap: Snapshot) -> Problem:
    with pytest.raises(Problem) as caught:
        await verifier.verify(token, snap)
    assert caught.value.status == 401
    return caught.value


async def test_valid_token_verifies_against_a_warmed_global_jwks(
    sqlite_cp: ControlPlane, jwks_server: JwksServer
) -> None:
    acme = onboard(sqlite_cp, "Acme")
    jwks_server.docs["jwks.json"] = {"keys": [jwk(RSA_1, "k1")]}
    verifier = JwtVerifier(jwt_settings(jwks_url=f"{jwks_server.base}/jwks.json"))
    snap = load_snapshot(sqlite_cp.engine)
    try:
        await verifier.warm(snap)
        principal = await verifier.verify(sign(claims(acme)), snap)
        assert principal.tenant_id == acme and principal.subject == "user-1"
        assert principal.scopes == {"orders:read", "orders:write"}
        listed = await verifier.verify(sign(claims(acme, scope=None, scp=["a:b"])), snap)
        assert listed.scopes == {"a:b"}
        # Within the 30 s leeway an just-expired token still passes.
        await verifier.verify(sign(claims(acme, exp=int(time.time()) - 10)), snap)
        assert jwks_server.hits["jwks.json"] == 1  # warmed once, nothing on the request path
    finally:
        await verifier.close()


async def test_forged_and_invalid_tokens_are_refused(
    sqlite_cp: ControlPlane, jwks_server: JwksServer
) -> None:
    acme = onboard(sqlite_cp, "Acme")
    jwks_server.docs["jwks.json"] = {"keys": [jwk(RSA_1, "k1")]}
    verifier = JwtVerifier(jwt_settings(jwks_url=f"{jwks_server.base}/jwks.json"))
    snap = load_snapshot(sqlite_cp.engine)
    public_pem = RSA_1.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    try:
        await verifier.warm(snap)
        cases = {
            "alg none": forge({"alg": "none", "kid": "k1"}, claims(acme), None),
            "alg None": forge({"alg": "None", "kid": "k1"}, claims(acme), None),
            "HS256 keyed with the RSA public key": forge(
                {"alg": "HS256", "kid": "k1"}, claims(acme), public_pem
            ),
            "expired": sign(claims(acme, exp=now - 3600)),
            "wrong aud": sign(claims(acme, aud="someone-else")),
            "wrong iss": sign(claims(acme, iss="https://evil.example")),
            "no exp": sign(claims(acme, exp=None)),
            "no aud": sign(claims(acme, aud=None)),
            "no iss": sign(claims(acme, iss=None)),
            "no tenant claim": sign(claims(acme, tenant_id=None)),
            "unknown tenant": sign(claims("nobody-000000")),
            "wrong key": sign(claims(acme), key=RSA_2),
            "EC token against an RSA key": sign(claims(acme), key=EC_1, alg="ES256"),
            "garbage": "not.a.jwt",
        }
        for name, token in cases.items():
            problem = await rejected(verifier, token, snap)
            assert problem.headers["WWW-Authenticate"].startswith("Bearer"), name
    finally:
        await verifier.close()


async def test_unknown_kid_refetches_at_most_once_per_interval(
    sqlite_cp: ControlPlane, jwks_server: JwksServer
) -> None:
    acme = onboard(sqlite_cp, "Acme")
    jwks_server.docs["jwks.json"] = {"keys": [jwk(RSA_1, "k1")]}
    verifier = JwtVerifier(
        jwt_settings(jwks_url=f"{jwks_server.base}/jwks.json", jwks_min_refetch_s=3600)
    )
    snap = load_snapshot(sqlite_cp.engine)
    try:
        # A cold cache counts as an unknown kid: the first request fetches.
        await verifier.verify(sign(claims(acme)), snap)
        assert jwks_server.hits["jwks.json"] == 1
        for kid in ("bogus-1", "bogus-2", "bogus-3"):
            await rejected(verifier, sign(claims(acme), key=RSA_2, kid=kid), snap)
        assert jwks_server.hits["jwks.json"] == 1  # the first fetch was under an hour ago
        await verifier.verify(sign(claims(acme)), snap)
    finally:
        await verifier.close()


async def test_key_rotation_is_picked_up_by_the_unknown_kid_refetch(
    sqlite_cp: ControlPlane, jwks_server: JwksServer
) -> None:
    acme = onboard(sqlite_cp, "Acme")
    jwks_server.docs["jwks.json"] = {"keys": [jwk(RSA_1, "k1")]}
    verifier = JwtVerifier(
        jwt_settings(jwks_url=f"{jwks_server.base}/jwks.json", jwks_min_refetch_s=0)
    )
    snap = load_snapshot(sqlite_cp.engine)
    try:
        await verifier.warm(snap)
        await verifier.verify(sign(claims(acme)), snap)
        jwks_server.docs["jwks.json"] = {"keys": [jwk(RSA_1, "k1"), jwk(RSA_2, "k2")]}
        await verifier.verify(sign(claims(acme), key=RSA_2, kid="k2"), snap)
        assert jwks_server.hits["jwks.json"] == 2
        await verifier.verify(sign(claims(acme)), snap)  # the overlap: both keys valid
        jwks_server.docs["jwks.json"] = {"keys": [jwk(RSA_2, "k2")]}
        await verifier.warm(snap, max_age_s=0)  # the background refresh drops k1
        await rejected(verifier, sign(claims(acme)), snap)
        await verifier.verify(sign(claims(acme), key=RSA_2, kid="k2"), snap)
    finally:
        await verifier.close()


async def test_a_tenant_claim_only_unlocks_that_tenants_own_jwks(
    sqlite_cp: ControlPlane, jwks_server: JwksServer
) -> None:
    jwks_server.docs["a.json"] = {"keys": [jwk(RSA_1, "a1")]}
    jwks_server.docs["b.json"] = {"keys": [jwk(RSA_2, "b1")]}
    alpha = onboard(sqlite_cp, "Alpha", {"jwks_url": f"{jwks_server.base}/a.json"})
    beta = onboard(sqlite_cp, "Beta", {"jwks_url": f"{jwks_server.base}/b.json"})
    verifier = JwtVerifier(jwt_settings(jwks_min_refetch_s=3600))
    snap = load_snapshot(sqlite_cp.engine)
    try:
        await verifier.warm(snap)
        assert (await verifier.verify(sign(claims(alpha), kid="a1"), snap)).tenant_id == alpha
        # Alpha's signer claims to be Beta: Beta's JWKS has no such kid, or the signature fails.
        await rejected(verifier, sign(claims(beta), kid="a1"), snap)
        await rejected(verifier, sign(claims(beta), kid="b1"), snap)
        assert (
            await verifier.verify(sign(claims(beta), key=RSA_2, kid="b1"), snap)
        ).tenant_id == beta
    finally:
        await verifier.close()


async def test_inline_jwks_needs_no_fetch(sqlite_cp: ControlPlane) -> None:
    acme = onboard(sqlite_cp, "Acme", {"jwks": {"keys": [jwk(RSA_1, "k1")]}})
    verifier = JwtVerifier(jwt_settings())
    snap = load_snapshot(sqlite_cp.engine)
    try:
        assert (await verifier.verify(sign(claims(acme)), snap)).tenant_id == acme
        # A lone key also verifies a token without a kid.
        assert (await verifier.verify(sign(claims(acme), kid=None), snap)).tenant_id == acme
        assert verifier.fetches == 0
    finally:
        await verifier.close()


async def test_hmac_only_configuration_with_an_oct_key(sqlite_cp: ControlPlane) -> None:
    secret = b"0123456789abcdef0123456789abcdef"
    oct_key = {"kty": "oct", "kid": "h1", "k": b64(secret).decode()}
    acme = onboard(sqlite_cp, "Acme", {"jwks": {"keys": [oct_key]}})
    verifier = JwtVerifier(jwt_settings(jwt_algorithms=("HS256",)))
    snap = load_snapshot(sqlite_cp.engine)
    token = jwt.encode(claims(acme), secret, algorithm="HS256", headers={"kid": "h1"})
    assert (await verifier.verify(token, snap)).tenant_id == acme
    await rejected(verifier, sign(claims(acme), kid="h1"), snap)  # RS256 is not on the list


async def test_hmac_configuration_never_keys_hmac_with_a_public_key(
    sqlite_cp: ControlPlane,
) -> None:
    acme = onboard(sqlite_cp, "Acme", {"jwks": {"keys": [jwk(RSA_1, "k1")]}})
    verifier = JwtVerifier(jwt_settings(jwt_algorithms=("HS256",)))
    snap = load_snapshot(sqlite_cp.engine)
    public_pem = RSA_1.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = forge({"alg": "HS256", "kid": "k1"}, claims(acme), public_pem)
    problem = await rejected(verifier, token, snap)
    assert "cannot verify HS256" in problem.detail


async def test_unreachable_jwks_is_refused_and_throttled(sqlite_cp: ControlPlane) -> None:
    acme = onboard(sqlite_cp, "Acme", {"jwks_url": "http://127.0.0.1:1/jwks.json"})
    verifier = JwtVerifier(jwt_settings(jwks_min_refetch_s=3600))
    snap = load_snapshot(sqlite_cp.engine)
    try:
        await rejected(verifier, sign(claims(acme)), snap)
        await rejected(verifier, sign(claims(acme)), snap)
        assert verifier.fetches == 1
    finally:
        await verifier.close()


@pytest.mark.parametrize(
    "algorithms",
    [(), ("none",), ("RS256", "none"), ("HS256", "RS256"), ("ES256", "HS512"), ("XX1",)],
)
def test_unsafe_algorithm_configurations_are_refused(algorithms: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="jwt_algorithms"):
        check_algorithms(algorithms)
    with pytest.raises(ValueError, match="jwt_algorithms"):
        JwtVerifier(jwt_settings(jwt_algorithms=algorithms))


def test_safe_algorithm_configurations_are_kept() -> None:
    assert check_algorithms(("RS256", "ES256", "RS256")) == ("RS256", "ES256")
    assert check_algorithms(("HS256", "HS512")) == ("HS256", "HS512")
