"""Which headers cross the gateway, in each direction, and which it adds.

Pure functions over ASGI-style `(name, value)` byte pairs so the rules can be tested without a
socket. Rules (docs/proxy.md):

- hop-by-hop headers, and every header the sender named in `Connection`, never cross;
- the client cannot speak for the gateway: tenant-context headers (`X-Tenant-ID`,
  `X-Tollway-*`, `Tollway-*`) are dropped, and forwarding headers are only extended when the
  direct peer is a trusted proxy, otherwise replaced;
- the tenant's Tollway credential (`X-API-Key`, `Authorization: Bearer tw_...`) stays at the
  gateway; any other `Authorization` is the upstream's business and passes;
- the upstream's `Tollway-Units` report is for the gateway only and is cut from the response.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
# Forwarding headers a client could forge; replaced unless the peer is a trusted proxy.
FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
     b"forwarded", b"x-real-ip"}
)
# Client credentials and tenant hints that must not reach the upstream; `Expect` was already
# answered by the ASGI server.
DROPPED_REQUEST = frozenset({b"x-tenant-id", b"x-api-key", b"expect"})
UNITS_HEADER = b"tollway-units"
TOLLWAY_KEY_PREFIX = b"bearer tw_"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_PEER_CACHE_MAX = 4096

Header = tuple[bytes, bytes]


class TrustedProxies:
    """Peers whose `X-Forwarded-*`/`Forwarded` headers are believed. Membership is cached per
    address string because the same few load balancers connect over and over."""

    __slots__ = ("_cache", "_networks")

    def __init__(self, entries: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(e.strip(), strict=False) for e in entries)
        self._cache: dict[str, bool] = {}

    def __contains__(self, peer: object) -> bool:
        if not self._networks or not isinstance(peer, str):
            return False
        hit = self._cache.get(peer)
        if hit is not None:
            return hit
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            trusted = False
        else:
            trusted = any(addr in net for net in self._networks)
        if len(self._cache) >= _PEER_CACHE_MAX:
            self._cache.clear()
        self._cache[peer] = trusted
        return trusted


def connection_tokens(headers: Iterable[Header]) -> frozenset[bytes]:
    """Header names listed in any `Connection` header, lowercased."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def header_bytes(headers: Iterable[Header]) -> int:
    """Size of the header block as it would appear on the wire (`name: value\\r\\n`)."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


def _passes(name: bytes, value: bytes, named: frozenset[bytes]) -> bool:
    if name in HOP_BY_HOP or name in named or name in DROPPED_REQUEST:
        return False
    if name.startswith((b"x-tollway-", b"tollway-")):
        return False
    return not (name == b"authorization" and value[:10].lower() == TOLLWAY_KEY_PREFIX)


def _forwarded_value(value: bytes) -> bytes:
    """An RFC 7239 value: a token if it is one, else a quoted-string."""
    if _TOKEN.fullmatch(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _forwarded_node(addr: bytes) -> bytes:
    if b":" in addr:  # IPv6 must be bracketed, and brackets/colons force quoting
        return b'"[' + addr + b']"'
    return _forwarded_value(addr)


def request_headers(
    headers: Iterable[Header],
    *,
    client: str | None,
    scheme: str,
    trusted: TrustedProxies,
) -> list[Header]:
    """The header list to send upstream for a client request.

    `client` is the direct peer's address (ASGI `scope["client"][0]`), `scheme` the scheme the
    client used. The upstream `Host` is left for the upstream client to set from the upstream
    URL; names keep the client's spelling.
    """
    headers = headers if isinstance(headers, (list, tuple)) else list(headers)
    named = connection_tokens(headers)
    peer_trusted = client in trusted
    out: list[Header] = []
    host = prior_for = prior_proto = prior_host = prior_fwd = cookie = None
    for raw_name, value in headers:
        name = raw_name.lower()
        if name == b"host":
            host = value
        elif name == b"cookie":  # HTTP/2 clients may split it; HTTP/1.1 allows one line
            cookie = value if cookie is None else cookie + b"; " + value
        elif name in FORWARDING and name not in named:
            if not peer_trusted:
                continue
            if name == b"x-forwarded-for":
                prior_for = value if prior_for is None else prior_for + b", " + value
            elif name == b"forwarded":
                prior_fwd = value if prior_fwd is None else prior_fwd + b", " + value
            elif name == b"x-forwarded-proto":
                prior_proto = value
            elif name == b"x-forwarded-host":
                prior_host = value
            else:
                out.append((raw_name, value))
        elif _passes(name, value, named):
            out.append((raw_name, value))

    if cookie is not None and b"cookie" not in named:
        out.append((b"Cookie", cookie))
    peer = client.encode() if client else b"unknown"
    proto = scheme.encode()
    out.append((b"X-Forwarded-For", peer if prior_for is None else prior_for + b", " + peer))
    out.append((b"X-Forwarded-Proto", prior_proto or proto))
    if prior_host or host:
        out.append((b"X-Forwarded-Host", prior_host or host))  # type: ignore[arg-type]
    element = b"for=" + _forwarded_node(peer) + b";proto=" + proto
    if host:
        element += b";host=" + _forwarded_value(host)
    out.append((b"Forwarded", element if prior_fwd is None else prior_fwd + b", " + element))
    return out


def response_headers(headers: Iterable[Header]) -> tuple[list[Header], bytes | None]:
    """The upstream's response headers as the client may see them, plus the raw value of the
    upstream's `Tollway-Units` report (several lines are joined with commas)."""
    headers = headers if isinstance(headers, (list, tuple)) else list(headers)
    named = connection_tokens(headers)
    out: list[Header] = []
    units: bytes | None = None
    for raw_name, value in headers:
        name = raw_name.lower()
        if name == UNITS_HEADER:
            units = value if units is None else units + b"," + value
        elif name not in HOP_BY_HOP and name not in named:
            out.append((raw_name, value))
    return out, units
