"""JWT bearer authentication against cached JWKS.

The token's tenant claim picks which JWKS may verify it: the tenant's own (inline `jwks` or
`jwks_url` in its settings) or the global `jwks_url`. Naming another tenant in the claim
therefore only helps an attacker who holds that tenant's signing key.

Algorithm confusion is closed three ways: the allow-list never contains `none` and never
mixes HMAC with public-key families (refused at start-up), the header's `alg` must be on the
list, and the JWK's key type must match that algorithm's family.

JWKS are fetched off the hot path (`warm`), except when a token names a `kid` the cache does
not hold: then the source is refetched, at most once per `jwks_min_refetch_s`, which is how
key rotation is picked up without letting bogus kids turn into a fetch storm.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import jwt
import orjson
from jwt import PyJWK, PyJWKSet

from tenancy.problems import Problem
from tenancy.settings import Settings

if TYPE_CHECKING:
    from gateway.snapshot import Snapshot, TenantRecord

log = logging.getLogger("tollway.jwt")

KEY_TYPES = {"HS": "oct", "RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
KNOWN_ALGORITHMS = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
     "ES256", "ES256K", "ES384", "ES512", "EdDSA"}
)
MAX_JWKS_BYTES = 256 * 1024
FETCH_TIMEOUT_S = 3.0
REQUIRED_CLAIMS = ["exp", "iss", "aud"]


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    tenant_id: str
    scopes: frozenset[str]
    claims: Mapping[str, Any]


@dataclass(slots=True)
class _Source:
    keys: Mapping[str, PyJWK] = field(default_factory=dict)
    last_attempt: float = -math.inf
    fetched_at: float = -math.inf
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def check_algorithms(algorithms: Iterable[str]) -> tuple[str, ...]:
    """Refuse a configuration that could let one key type be verified as another."""
    algs = tuple(dict.fromkeys(algorithms))
    if not algs:
        raise ValueError("jwt_algorithms must name at least one algorithm")
    unknown = [a for a in algs if a not in KNOWN_ALGORITHMS]
    if unknown:
        raise ValueError(f"jwt_algorithms: unsupported or forbidden {unknown} (never 'none')")
    hmac = {a for a in algs if a.startswith("HS")}
    if hmac and len(hmac) != len(algs):
        raise ValueError("jwt_algorithms must not mix HMAC (HS*) with public-key algorithms")
    return algs


def parse_jwks(doc: Any) -> dict[str, PyJWK]:
    """A JWKS document as kid -> key; a key without a kid is filed under ''."""
    if isinstance(doc, str | bytes):
        try:
            doc = orjson.loads(doc)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"JWKS is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError("JWKS must be an object with a 'keys' list")
    try:
        key_set = PyJWKSet.from_dict(doc)
    except jwt.PyJWTError as exc:
        raise ValueError(str(exc)) from exc
    return {key.key_id or "": key for key in key_set.keys}


def _unauthorized(detail: str) -> Problem:
    return Problem(
        401, detail, kind="invalid-token",
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


class JwtVerifier:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession | None = None) -> None:
        self._algorithms = frozenset(check_algorithms(settings.jwt_algorithms))
        self._claim = settings.jwt_tenant_claim
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway_s
        self._global_url = settings.jwks_url
        self._min_refetch_s = settings.jwks_min_refetch_s
        self._session = session
        self._owns_session = session is None
        self._sources: dict[str, _Source] = {}
        self.fetches = 0

    async def verify(self, token: str, snapshot: Snapshot) -> Principal:
        header, claims = _peek(token)
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise _unauthorized(f"token algorithm {alg!r} is not allowed")
        tenant_id = claims.get(self._claim)
        tenant = snapshot.tenants.get(tenant_id) if isinstance(tenant_id, str) else None
        if tenant is None:
            raise _unauthorized(f"token claim {self._claim!r} names no known tenant")
        issuer = tenant.jwt_issuer or self._issuer
        audience = tenant.jwt_audience or self._audience
        if issuer is None or audience is None:
            raise _unauthorized("JWT authentication is not configured for this tenant")
        key = await self._key(tenant, header.get("kid"))
        if KEY_TYPES.get(alg[:2]) != key.key_type or _declared_alg(key) not in (None, alg):
            raise _unauthorized(f"key {header.get('kid')!r} cannot verify {alg}")
        try:
            verified = jwt.decode(
                token, key.key, algorithms=[alg], issuer=issuer, audience=audience,
                leeway=self._leeway, options={"require": REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as exc:
            raise _unauthorized(f"token rejected: {exc}") from None
        return Principal(
            subject=str(verified.get("sub", "")), tenant_id=tenant.id,
            scopes=_scopes(verified), claims=verified,
        )

    async def _key(self, tenant: TenantRecord, kid: Any) -> PyJWK:
        if kid is not None and not isinstance(kid, str):
            raise _unauthorized("token kid must be a string")
        if tenant.jwks is not None:
            key = _pick(tenant.jwks, kid)
        else:
            url = tenant.jwks_url or self._global_url
            if url is None:
                raise _unauthorized("no JWKS is configured for this tenant")
            source = self._source(url)
            key = _pick(source.keys, kid)
            if key is None:
                key = await self._refetch_for(url, source, kid)
        if key is None:
            raise _unauthorized(f"no signing key with kid {kid!r}")
        return key

    def _source(self, url: str) -> _Source:
        source = self._sources.get(url)
        if source is None:
            source = self._sources[url] = _Source()
        return source

    async def _refetch_for(self, url: str, source: _Source, kid: str | None) -> PyJWK | None:
        """The one fetch on the request path, throttled per source; concurrent misses share it."""
        async with source.lock:
            key = _pick(source.keys, kid)
            if key is None and time.monotonic() - source.last_attempt >= self._min_refetch_s:
                await self._fetch(url, source)
                key = _pick(source.keys, kid)
            return key

    async def warm(self, snapshot: Snapshot, max_age_s: float | None = None) -> None:
        """Fetch every JWKS the snapshot refers to that is missing (or older than max_age_s)."""
        urls = {t.jwks_url for t in snapshot.tenants.values() if t.jwks_url and t.jwks is None}
        if self._global_url:
            urls.add(self._global_url)
        now = time.monotonic()
        stale = []
        for url in urls:
            source = self._source(url)
            age = now - source.fetched_at
            if not source.keys or (max_age_s is not None and age >= max_age_s):
                stale.append(self._locked_fetch(url, source))
        await asyncio.gather(*stale)

    async def _locked_fetch(self, url: str, source: _Source) -> None:
        async with source.lock:
            await self._fetch(url, source)

    async def _fetch(self, url: str, source: _Source) -> None:
        source.last_attempt = time.monotonic()
        self.fetches += 1
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
            )
        try:
            async with self._session.get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = await resp.content.read(MAX_JWKS_BYTES + 1)
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
            source.keys = parse_jwks(body)
            source.fetched_at = time.monotonic()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("JWKS fetch from %s failed, keeping %d cached keys: %s", url,
                        len(source.keys), exc)

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims, unverified, only to choose the algorithm and the JWKS. PyJWT's own
    parse validates strictly but costs as much as the signature check; the verified decode
    that follows repeats it, so this one may be lenient."""
    parts = token.split(".")
    if len(parts) != 3:
        raise _unauthorized("malformed token: expected three segments")
    try:
        header = orjson.loads(_b64decode(parts[0]))
        claims = orjson.loads(_b64decode(parts[1]))
    except (ValueError, binascii.Error):
        raise _unauthorized("malformed token: bad header or payload encoding") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise _unauthorized("malformed token: header and payload must be objects")
    return header, claims


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _pick(keys: Mapping[str, PyJWK], kid: str | None) -> PyJWK | None:
    if kid is not None:
        return keys.get(kid)
    if len(keys) == 1:
        return next(iter(keys.values()))
    return None


def _declared_alg(key: PyJWK) -> Any:
    """The JWK's own `alg`; PyJWK's `algorithm_name` fills in a default when it is absent."""
    return key._jwk_data.get("alg")


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    scope = claims.get("scope")
    if isinstance(scope, str):
        return frozenset(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        return frozenset(s for s in scp if isinstance(s, str))
    if isinstance(scp, str):
        return frozenset(scp.split())
    return frozenset()
