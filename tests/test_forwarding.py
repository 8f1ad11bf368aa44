"""Header rules (gateway.forwarding) and the upstream units report (gateway.units)."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.forwarding import (
    HOP_BY_HOP,
    TrustedProxies,
    connection_tokens,
    header_bytes,
    request_headers,
    response_headers,
)
from gateway.units import MAX_ENTRIES, invalid_units, parse_units

NOBODY = TrustedProxies(())


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n.lower() for n, _ in headers]


def value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    found = [v for n, v in headers if n.lower() == name]
    assert len(found) == 1, (name, headers)
    return found[0]


def test_hop_by_hop_and_connection_named_headers_dropped_from_request() -> None:
    out = request_headers(
        [
            (b"host", b"api.example.com"),
            (b"connection", b"keep-alive, X-Internal"),
            (b"Connection", b"x-other"),
            (b"x-internal", b"1"),
            (b"X-Other", b"2"),
            (b"te", b"trailers"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"websocket"),
            (b"proxy-authorization", b"Basic eA=="),
            (b"proxy-connection", b"keep-alive"),
            (b"trailer", b"x"),
            (b"keep-alive", b"timeout=5"),
            (b"accept", b"*/*"),
        ],
        client="192.0.2.1",
        scheme="https",
        trusted=NOBODY,
    )
    sent = names(out)
    for gone in [*HOP_BY_HOP, b"x-internal", b"x-other", b"host"]:
        assert gone not in sent
    assert value(out, b"accept") == b"*/*"
    assert value(out, b"x-forwarded-proto") == b"https"
    assert value(out, b"x-forwarded-host") == b"api.example.com"


def test_tenant_context_and_tollway_credentials_dropped() -> None:
    out = request_headers(
        [
            (b"X-Tenant-ID", b"t_other"),
            (b"x-tollway-tenant", b"forged"),
            (b"tollway-units", b"tokens=1"),
            (b"x-api-key", b"tw_live_x"),
            (b"authorization", b"Bearer TW_live_x"),
            (b"x-tollway", b"kept: the prefix needs the dash"),
            (b"expect", b"100-continue"),
        ],
        client="192.0.2.1", scheme="http", trusted=NOBODY,
    )
    assert out[0] == (b"x-tollway", b"kept: the prefix needs the dash")
    assert not {b"x-tenant-id", b"x-tollway-tenant", b"tollway-units", b"x-api-key",
                b"authorization", b"expect"} & set(names(out))


def test_other_authorization_passes() -> None:
    for auth in (b"Basic dXNlcjpwYXNz", b"Bearer eyJ0eXAi.a.b", b"Bearer tw"):
        out = request_headers([(b"authorization", auth)], client="192.0.2.1", scheme="http",
                              trusted=NOBODY)
        assert value(out, b"authorization") == auth


def test_untrusted_peer_forwarding_headers_replaced() -> None:
    out = request_headers(
        [(b"x-forwarded-for", b"1.1.1.1"), (b"forwarded", b"for=1.1.1.1"),
         (b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"evil"),
         (b"x-real-ip", b"1.1.1.1"), (b"host", b"h")],
        client="192.0.2.1", scheme="http", trusted=TrustedProxies(["10.0.0.0/8"]),
    )
    assert value(out, b"x-forwarded-for") == b"192.0.2.1"
    assert value(out, b"forwarded") == b"for=192.0.2.1;proto=http;host=h"
    assert value(out, b"x-forwarded-proto") == b"http"
    assert value(out, b"x-forwarded-host") == b"h"
    assert b"x-real-ip" not in names(out)


def test_trusted_peer_forwarding_headers_extended() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "2001:db8::/32", "127.0.0.1"])
    out = request_headers(
        [(b"x-forwarded-for", b"1.1.1.1"), (b"X-Forwarded-For", b"2.2.2.2"),
         (b"forwarded", b'for="[2001:db8::9]"'), (b"x-forwarded-proto", b"https"),
         (b"x-forwarded-host", b"public.example"), (b"x-real-ip", b"1.1.1.1"),
         (b"host", b"internal:8080")],
        client="10.0.0.2", scheme="http", trusted=trusted,
    )
    assert value(out, b"x-forwarded-for") == b"1.1.1.1, 2.2.2.2, 10.0.0.2"
    assert value(out, b"forwarded") == (
        b'for="[2001:db8::9]", for=10.0.0.2;proto=http;host="internal:8080"'
    )
    assert value(out, b"x-forwarded-proto") == b"https"
    assert value(out, b"x-forwarded-host") == b"public.example"
    assert value(out, b"x-real-ip") == b"1.1.1.1"
    assert "127.0.0.1" in trusted and "2001:db8::5" in trusted
    assert "127.0.0.2" not in trusted and None not in trusted and "not-an-ip" not in trusted


def test_forwarded_ipv6_and_unknown_peer() -> None:
    out = request_headers([], client="::1", scheme="https", trusted=NOBODY)
    assert value(out, b"forwarded") == b'for="[::1]";proto=https'
    assert value(out, b"x-forwarded-for") == b"::1"
    assert b"x-forwarded-host" not in names(out)
    out = request_headers([(b"host", b'a"b')], client=None, scheme="http", trusted=NOBODY)
    assert value(out, b"forwarded") == b'for=unknown;proto=http;host="a\\"b"'


def test_names_keep_the_clients_spelling() -> None:
    out = request_headers([(b"X-Request-ID", b"r1"), (b"accept", b"*/*")],
                          client="192.0.2.1", scheme="http", trusted=NOBODY)
    assert out[:2] == [(b"X-Request-ID", b"r1"), (b"accept", b"*/*")]


def test_split_cookie_lines_are_joined() -> None:
    out = request_headers([(b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2")],
                          client="192.0.2.1", scheme="http", trusted=NOBODY)
    assert value(out, b"cookie") == b"a=1; b=2"


def test_non_utf8_header_value_survives() -> None:
    out = request_headers([(b"x-latin", b"caf\xe9")], client="192.0.2.1", scheme="http",
                          trusted=NOBODY)
    assert value(out, b"x-latin") == b"caf\xe9"  # passed through as is, not re-encoded


def test_response_hop_by_hop_named_and_units() -> None:
    out, units = response_headers(
        [(b"Content-Type", b"text/plain"), (b"Connection", b"X-Secret"), (b"X-Secret", b"1"),
         (b"Transfer-Encoding", b"chunked"), (b"Keep-Alive", b"timeout=5"),
         (b"Tollway-Units", b"tokens=1"), (b"tollway-units", b"images=2"),
         (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")]
    )
    assert out == [(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1"),
                   (b"Set-Cookie", b"b=2")]
    assert units == b"tokens=1,images=2"


def test_connection_tokens_and_sizes() -> None:
    assert connection_tokens([(b"Connection", b" Close ,X-A,, x-b ")]) == {b"close", b"x-a", b"x-b"}
    assert header_bytes([(b"ab", b"cde")]) == 9


header_name = st.sampled_from(
    [b"connection", b"keep-alive", b"te", b"upgrade", b"x-a", b"x-b", b"x-tenant-id",
     b"x-tollway-tenant", b"tollway-units", b"x-api-key", b"accept", b"x-forwarded-for"]
)
header_list = st.lists(
    st.tuples(header_name, st.sampled_from([b"x-a", b"x-b, close", b"1", b"", b"tw_"])),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(header_list)
def test_nothing_forbidden_ever_reaches_the_upstream(headers: list[tuple[bytes, bytes]]) -> None:
    out = request_headers(headers, client="192.0.2.1", scheme="http", trusted=NOBODY)
    named = connection_tokens(headers)
    sent = names(out)
    forbidden = HOP_BY_HOP | named | {
        b"x-tenant-id", b"x-tollway-tenant", b"tollway-units", b"x-api-key"}
    assert not forbidden & (set(sent) - {b"x-forwarded-for"})
    assert sent.count(b"x-forwarded-for") == 1 and value(out, b"x-forwarded-for") == b"192.0.2.1"


@settings(max_examples=200, deadline=None)
@given(header_list)
def test_nothing_forbidden_ever_reaches_the_client(headers: list[tuple[bytes, bytes]]) -> None:
    out, _ = response_headers(headers)
    named = connection_tokens(headers)
    for name, _ in out:
        assert name not in HOP_BY_HOP and name not in named and name != b"tollway-units"


def invalid_count(reason: str) -> float:
    return float(invalid_units.labels(reason)._value.get())


def test_units_parse() -> None:
    assert parse_units(b"tokens=1234, images=2") == {"tokens": Decimal(1234),
                                                      "images": Decimal(2)}
    assert parse_units(b"Tokens = 1.5 ,tokens=2") == {"tokens": Decimal("3.5")}
    assert parse_units(None) == {} and parse_units(b"") == {}


def test_units_invalid_entries_are_ignored_and_counted() -> None:
    before = invalid_count("malformed")
    got = parse_units(b"tokens=-1, x=NaN, y=Infinity, z=1e9, 9bad=1, ok=7, w=, =3")
    assert got == {"ok": Decimal(7)}
    assert invalid_count("malformed") - before == 7


def test_units_bounds() -> None:
    before = invalid_count("too_long")
    assert parse_units(b"a=1," * 300) == {}
    assert invalid_count("too_long") - before == 1
    before = invalid_count("too_many")
    many = ",".join(f"u{i}=1" for i in range(MAX_ENTRIES + 3)).encode()
    got = parse_units(many)
    assert len(got) == MAX_ENTRIES and "u0" in got
    assert invalid_count("too_many") - before == 3
    assert parse_units(b"big=" + b"9" * 19) == {}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_units_never_raise(raw: bytes) -> None:
    units = parse_units(raw)
    assert len(units) <= MAX_ENTRIES
    assert all(v >= 0 and v.is_finite() for v in units.values())
