"""The signed X-Tollway-Tenant header: round trip, rotation, tampering, age, key file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import stat
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.tenant_signature import HEADER, KEY_FILE, TenantSigner, key_id_of, local_secret
from tenancy.settings import load_settings

OLD = b"o" * 32
NEW = b"n" * 40
NOW = 1_780_000_000.4


def test_round_trip_and_format() -> None:
    signer = TenantSigner([OLD])
    value = signer.sign("ten_123", "key_abc", NOW)
    assert HEADER == b"X-Tollway-Tenant"
    assert value.startswith(f"t=ten_123,k=key_abc,ts=1780000000,kid={key_id_of(OLD)},sig=".encode())
    claims = signer.verify(value, max_age_s=60, now=NOW + 30)
    assert claims is not None
    assert (claims.tenant_id, claims.key_id, claims.issued_at) == ("ten_123", "key_abc", 1780000000)
    assert signer.verify(value.decode(), max_age_s=60, now=NOW) == claims
    assert signer.verify(signer.sign("t", "k", time.time()), max_age_s=5) is not None


def test_independent_verification_as_documented() -> None:
    """What docs/proxy.md tells upstream authors to do, with only the standard library."""
    value = TenantSigner([OLD]).sign("ten_1", "key_1", NOW)
    signed, _, sig = value.rpartition(b",sig=")
    expected = base64.urlsafe_b64encode(
        hmac.new(OLD, signed, hashlib.sha256).digest()).rstrip(b"=")
    assert hmac.compare_digest(sig, expected)
    fields = dict(part.split(b"=", 1) for part in signed.split(b","))
    assert fields[b"t"] == b"ten_1" and int(fields[b"ts"]) == int(NOW)


def test_rotation_first_signs_all_verify() -> None:
    old_value = TenantSigner([OLD]).sign("t1", "k1", NOW)
    rotated = TenantSigner([NEW, OLD])
    new_value = rotated.sign("t1", "k1", NOW)
    assert f"kid={key_id_of(NEW)}".encode() in new_value
    assert rotated.verify(old_value, 60, NOW) is not None
    assert rotated.verify(new_value, 60, NOW) is not None
    retired = TenantSigner([NEW])
    assert retired.verify(old_value, 60, NOW) is None
    assert TenantSigner([OLD]).verify(new_value, 60, NOW) is None


def test_tampering_is_rejected() -> None:
    signer = TenantSigner([OLD])
    value = signer.sign("ten_1", "key_1", NOW)
    forgeries = [
        value.replace(b"t=ten_1", b"t=ten_2"),
        value.replace(b"k=key_1", b"k=key_2"),
        value.replace(b"ts=1780000000", b"ts=1780000001"),
        value[:-2] + (b"AA" if value[-2:] != b"AA" else b"BB"),
        value.replace(b",sig=", b",sag="),
        b"t=ten_1,t=ten_2," + value,
        value.replace(b"kid=" + key_id_of(OLD).encode(), b"kid=00000000"),
        b"x" * 2000,
        b"",
    ]
    for forged in forgeries:
        assert signer.verify(forged, 60, NOW) is None, forged
    # a correct MAC by an unknown secret is no better
    assert signer.verify(TenantSigner([NEW]).sign("ten_1", "key_1", NOW), 60, NOW) is None


def test_age_bounds_both_ways() -> None:
    signer = TenantSigner([OLD])
    value = signer.sign("t", "k", NOW)
    assert signer.verify(value, 30, NOW + 29) is not None
    assert signer.verify(value, 30, NOW + 31) is None
    assert signer.verify(value, 30, NOW - 31) is None


def test_cached_within_the_second_only() -> None:
    signer = TenantSigner([OLD])
    first = signer.sign("t", "k", NOW)
    assert signer.sign("t", "k", NOW + 0.5) is first
    later = signer.sign("t", "k", NOW + 1)
    assert later != first and signer.verify(later, 5, NOW + 1) is not None
    assert signer.sign("t", "other", NOW) != first


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=40), st.text(max_size=40))
def test_any_identifiers_round_trip(tenant_id: str, key_id: str) -> None:
    signer = TenantSigner([OLD])
    claims = signer.verify(signer.sign(tenant_id, key_id, NOW), 60, NOW)
    assert claims is not None and (claims.tenant_id, claims.key_id) == (tenant_id, key_id)


def test_weak_or_missing_secrets_refused() -> None:
    with pytest.raises(ValueError):
        TenantSigner([])
    with pytest.raises(ValueError):
        TenantSigner([b"short"])


def test_configured_keys_win(tmp_path: Path) -> None:
    s = load_settings(env={}, data_dir=tmp_path, tenant_signing_keys=(NEW.decode(), OLD.decode()))
    signer = TenantSigner.from_settings(s)
    assert f"kid={key_id_of(NEW)}".encode() in signer.sign("t", "k", NOW)
    assert not (tmp_path / KEY_FILE).exists()


def test_local_secret_generated_once_private_and_shared(tmp_path: Path) -> None:
    data = tmp_path / "data"
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(local_secret(data)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results[0]) >= 32
    path = data / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in data.iterdir()] == [KEY_FILE]
    s = load_settings(env={}, data_dir=data)
    a = TenantSigner.from_settings(s).sign("t", "k", NOW)
    assert TenantSigner.from_settings(s).verify(a, 60, NOW) is not None
