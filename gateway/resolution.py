"""Which tenant a request belongs to, decided from the raw ASGI scope and the snapshot.

The credential (API key or JWT) names the tenant; every other source (subdomain, custom
domain, `/t/{tenant}` path prefix, `X-Tenant-ID`, a JWT's tenant claim next to a key) is only
a hint that must agree with it. A disagreeing hint is refused with 403 and counted: serving
as the hinted tenant, or silently ignoring the hint, would let one tenant's key act inside
another tenant's URL space. No credential is 401.

Everything is read from `scope` directly: the Host header from `scope["headers"]` (never
`request.url`, which trusts absolute-form targets), the path from `raw_path` so encoded
slashes and dot segments are seen before anything decodes them. Ambiguous input (duplicate
Host or credential headers, encoded slashes, dot segments) is refused with 400 rather than
guessed at.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from prometheus_client import Counter

from gateway.jwt_auth import JwtVerifier, Principal
from gateway.snapshot import KeyRecord, RouteRule, Snapshot, TenantRecord, host_key
from tenancy.keys import hash_secret, looks_valid
from tenancy.problems import Problem
from tenancy.settings import Settings

SOURCES = frozenset({"key", "jwt", "subdomain", "domain", "path", "header"})
KEY_PREFIX = "tw_"
PATH_PREFIX = "/t/"

# RFC 3986 host (IP-literal, or reg-name without percent-encoding) and an optional port.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=]+)(?::([0-9]{1,5}))?")
# Visible ASCII only, and never a backslash: some upstreams treat it as a separator.
_PATH = re.compile(rb"/[\x21-\x5b\x5d-\x7e]*")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})|%2[Ff]|%5[Cc]|%00")

_INSUFFICIENT = 'Bearer error="insufficient_scope", scope="{}"'

tenant_mismatches = Counter(
    "tollway_tenant_mismatch_total",
    "Requests refused because a tenant hint disagreed with the credential's tenant",
    ["source"],
)


@dataclass(frozen=True, slots=True)
class Resolved:
    tenant: TenantRecord
    key: KeyRecord | None
    principal: Principal | None
    scopes: frozenset[str]
    path: str  # decoded, tenant prefix removed: what route and scope rules match
    raw_path: bytes  # the same path still percent-encoded: what is forwarded upstream

    @property
    def subject(self) -> str:
        if self.key is not None:
            return self.key.id
        return self.principal.subject if self.principal is not None else ""


def _bad_request(detail: str) -> Problem:
    return Problem(400, detail, kind="bad-request")


def _unauthorized(detail: str) -> Problem:
    return Problem(
        401, detail, kind="unauthenticated", headers={"WWW-Authenticate": 'Bearer realm="tollway"'}
    )


def mismatch(source: str) -> Problem:
    tenant_mismatches.labels(source).inc()
    return Problem(
        403, f"the {source} names a different tenant than the credential",
        kind="tenant-mismatch", source=source,
    )


class Resolver:
    def __init__(self, settings: Settings, jwt: JwtVerifier | None = None) -> None:
        unknown = set(settings.tenant_sources) - SOURCES
        if unknown:
            raise ValueError(f"tenant_sources: unknown {sorted(unknown)}; known {sorted(SOURCES)}")
        enabled = set(settings.tenant_sources)
        self._keys = "key" in enabled
        self._jwt = jwt if "jwt" in enabled else None
        self._subdomain = "subdomain" in enabled
        self._domain = "domain" in enabled
        self._path = "path" in enabled
        self._header = "header" in enabled
        self._base_suffixes = tuple("." + host_key(b) for b in settings.base_domains)

    async def resolve(
        self, scope: Mapping[str, Any], snapshot: Snapshot, now: float | None = None
    ) -> Resolved:
        """The tenant and principal for this request, or a Problem (400/401/403) to answer."""
        host = authorization = api_key = tenant_header = None
        for name, value in scope["headers"]:
            if name == b"host":
                if host is not None:
                    raise _bad_request("more than one Host header")
                host = value
            elif name == b"authorization":
                if authorization is not None:
                    raise _bad_request("more than one Authorization header")
                authorization = value
            elif name == b"x-api-key":
                if api_key is not None:
                    raise _bad_request("more than one X-API-Key header")
                api_key = value
            elif name == b"x-tenant-id":
                if tenant_header is not None:
                    raise _bad_request("more than one X-Tenant-ID header")
                tenant_header = value
        hostname = None if host is None else parse_host(host)
        path, raw_path = normalise_path(scope)

        bearer = None if authorization is None else _bearer(authorization)
        secret = api_key.decode("latin-1") if api_key is not None else None
        if bearer is not None and bearer.startswith(KEY_PREFIX):
            if secret is not None:
                raise _bad_request("send the API key in one header, not two")
            secret, bearer = bearer, None
        key = None if secret is None else self._key(secret, snapshot, now or time.time())
        principal = None
        if bearer is not None:
            if self._jwt is None:
                raise _unauthorized("bearer tokens are not accepted")
            principal = await self._jwt.verify(bearer, snapshot)
        if key is not None:
            if principal is not None and principal.tenant_id != key.tenant_id:
                raise mismatch("jwt")
            tenant_id, scopes = key.tenant_id, key.scopes
        elif principal is not None:
            tenant_id, scopes = principal.tenant_id, principal.scopes
        else:
            raise _unauthorized("an API key or bearer token is required")
        tenant = snapshot.tenants.get(tenant_id)
        if tenant is None:
            raise _unauthorized("the credential's tenant does not exist")

        if self._header and tenant_header is not None and tenant_header != tenant.id.encode():
            raise mismatch("header")
        if hostname is not None:
            self._check_host(hostname, tenant, snapshot)
        if self._path and path.startswith(PATH_PREFIX):
            path, raw_path = _strip_tenant_prefix(path, raw_path, tenant, snapshot)
        check_scopes(scopes, path, tenant.routes)
        return Resolved(tenant, key, principal, scopes, path, raw_path)

    def _key(self, secret: str, snapshot: Snapshot, now: float) -> KeyRecord:
        if not self._keys:
            raise _unauthorized("API keys are not accepted")
        if not looks_valid(secret):
            raise _unauthorized("the API key is malformed")
        key = snapshot.keys.get(hash_secret(secret))
        if key is None or (key.expires_ts is not None and key.expires_ts <= now):
            raise _unauthorized("the API key is unknown, revoked or expired")
        return key

    def _check_host(self, hostname: str, tenant: TenantRecord, snapshot: Snapshot) -> None:
        if self._domain:
            owner = snapshot.by_domain.get(hostname)
            if owner is not None:
                if owner.id != tenant.id:
                    raise mismatch("domain")
                return
        if self._subdomain:
            for suffix in self._base_suffixes:
                if hostname.endswith(suffix):
                    label = hostname[: -len(suffix)]
                    if "." not in label and label != tenant.subdomain:
                        raise mismatch("subdomain")
                    return


def _bearer(value: bytes) -> str:
    scheme, _, token = value.decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("the Authorization header must be 'Bearer <token>'")
    return token


def parse_host(value: bytes) -> str:
    """The Host header's name part, lowercase and without a trailing dot; 400 on garbage."""
    match = _HOST.fullmatch(value)
    if match is None or (match[2] is not None and int(match[2]) > 65535):
        raise _bad_request("the Host header is not a valid host[:port]")
    name = match[1].decode("ascii").lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or name.endswith("."):
        raise _bad_request("the Host header is not a valid host[:port]")
    return name


def normalise_path(scope: Mapping[str, Any]) -> tuple[str, bytes]:
    """(decoded path, encoded path) with `//` collapsed; 400 for anything that decodes to a
    different path than it reads as: encoded `/` or `\\`, NUL, dot segments, bad escapes."""
    raw: bytes | None = scope.get("raw_path")
    if raw is None:
        raw = scope["path"].encode("utf-8")
    raw = raw.partition(b"?")[0]
    if _PATH.fullmatch(raw) is None:
        raise _bad_request("the request path must be an origin-form path of visible ASCII")
    if b"%" not in raw and b"/." not in raw and b"//" not in raw:
        return raw.decode("ascii"), raw
    if _BAD_ESCAPE.search(raw) is not None:
        raise _bad_request("the request path has an encoded slash, NUL or malformed escape")
    raw_segments = raw.split(b"/")
    segments = []
    for encoded in raw_segments:
        try:
            segments.append(unquote(encoded.decode("ascii"), errors="strict"))
        except UnicodeDecodeError:
            raise _bad_request("the request path is not UTF-8") from None
    if any(s in (".", "..") or not s.isprintable() for s in segments):
        raise _bad_request("the request path has dot segments or control characters")
    trailing = len(raw_segments) > 2 and raw_segments[-1] == b""
    kept = [i for i, s in enumerate(raw_segments) if s]
    path = "/" + "/".join(segments[i] for i in kept)
    raw = b"/" + b"/".join(raw_segments[i] for i in kept)
    if trailing and kept:
        path, raw = path + "/", raw + b"/"
    return path, raw


def _strip_tenant_prefix(
    path: str, raw_path: bytes, tenant: TenantRecord, snapshot: Snapshot
) -> tuple[str, bytes]:
    end = path.find("/", len(PATH_PREFIX))
    name = path[len(PATH_PREFIX) : end if end >= 0 else None]
    named = snapshot.tenants.get(name) or snapshot.by_subdomain.get(name.lower())
    if named is None or named.id != tenant.id:
        raise mismatch("path")
    raw_end = raw_path.find(b"/", len(PATH_PREFIX))
    if end < 0:
        return "/", b"/"
    return path[end:], raw_path[raw_end:]


def check_scopes(granted: frozenset[str], path: str, rules: tuple[RouteRule, ...]) -> None:
    """403 naming the first scope a matching route rule needs and the credential lacks."""
    if not rules or "*" in granted:
        return
    for rule in rules:
        prefix = rule.prefix
        if prefix == "/" or path == prefix or (
            path.startswith(prefix) and path[len(prefix)] == "/"
        ):
            for needed in rule.scopes:
                if needed not in granted:
                    raise Problem(
                        403, f"this route needs scope {needed!r}", kind="insufficient-scope",
                        scope=needed,
                        headers={"WWW-Authenticate": _INSUFFICIENT.format(needed)},
                    )
