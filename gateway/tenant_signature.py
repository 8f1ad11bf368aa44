"""The signed `X-Tollway-Tenant` header that tells an upstream who is calling.

The gateway strips every client-sent tenant header, so an upstream can trust this one as long
as it checks the MAC: `t=<tenant>,k=<key>,ts=<unix>,kid=<key id>,sig=<base64url HMAC-SHA256>`,
the MAC taken over everything before `,sig=`. `kid` is a fingerprint of the signing secret, so
verification picks the right secret in one lookup and rotation is "prepend a new secret,
drop the old one once no upstream is behind": the first secret signs, all verify.

Per request the gateway signs at most once per (tenant, key) per second: the value only
changes with `ts`, so the last one is cached. HMAC key setup is done once per secret.
Upstream-side verification without Tollway is described in docs/proxy.md.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from tenancy.settings import Settings

HEADER = b"X-Tollway-Tenant"
KEY_FILE = "tenant_signing.key"
MIN_SECRET_BYTES = 32
MAX_VALUE_BYTES = 1024
_CACHE_MAX = 8192
_SAFE = "-._~:@!$&'()*+;"  # unreserved plus sub-delims that cannot end a field


@dataclass(frozen=True, slots=True)
class TenantClaims:
    tenant_id: str
    key_id: str
    issued_at: int
    kid: str


def key_id_of(secret: bytes) -> str:
    """Public fingerprint of a secret; names it in headers without revealing it."""
    return hashlib.sha256(b"tollway-tenant-kid:" + secret).hexdigest()[:8]


class TenantSigner:
    __slots__ = ("_cache", "_macs", "_sign_kid", "_sign_mac")

    def __init__(self, secrets_: Sequence[bytes]) -> None:
        if not secrets_:
            raise ValueError("at least one tenant signing secret is required")
        for secret in secrets_:
            if len(secret) < MIN_SECRET_BYTES:
                raise ValueError(f"tenant signing secrets need {MIN_SECRET_BYTES}+ bytes")
        # Keyed HMAC objects are copied per use: the key schedule is paid once per secret.
        self._macs = {key_id_of(s): hmac.new(s, digestmod=hashlib.sha256) for s in secrets_}
        self._sign_kid = key_id_of(secrets_[0])
        self._sign_mac = self._macs[self._sign_kid]
        self._cache: dict[tuple[str, str], tuple[int, bytes]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> TenantSigner:
        if settings.tenant_signing_keys:
            return cls([s.encode() for s in settings.tenant_signing_keys])
        return cls([local_secret(settings.data_dir)])

    def sign(self, tenant_id: str, key_id: str, now: float) -> bytes:
        """The header value; one HMAC per (tenant, key) per second, cached in between."""
        ts = int(now)
        cached = self._cache.get((tenant_id, key_id))
        if cached is not None and cached[0] == ts:
            return cached[1]
        claims = (
            f"t={quote(tenant_id, safe=_SAFE)},k={quote(key_id, safe=_SAFE)},"
            f"ts={ts},kid={self._sign_kid}"
        )
        mac = self._sign_mac.copy()
        mac.update(claims.encode())
        sig = base64.urlsafe_b64encode(mac.digest()).rstrip(b"=")
        value = b"%s,sig=%s" % (claims.encode(), sig)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[(tenant_id, key_id)] = (ts, value)
        return value

    def verify(
        self, value: bytes | str, max_age_s: float, now: float | None = None
    ) -> TenantClaims | None:
        """Claims if the MAC checks out with a known secret and `ts` is within `max_age_s` of
        `now` (either side, for clock skew); otherwise None, with no hint why."""
        raw = value.encode() if isinstance(value, str) else value
        if len(raw) > MAX_VALUE_BYTES:
            return None
        claims, sep, sig = raw.rpartition(b",sig=")
        if not sep:
            return None
        fields: dict[str, str] = {}
        for part in claims.decode("ascii", "replace").split(","):
            name, eq, val = part.partition("=")
            if not eq or name in fields:
                return None
            fields[name] = val
        if set(fields) != {"t", "k", "ts", "kid"} or not fields["ts"].isdigit():
            return None
        mac = self._macs.get(fields["kid"])
        if mac is None:
            return None
        mac = mac.copy()
        mac.update(claims)
        expected = base64.urlsafe_b64encode(mac.digest()).rstrip(b"=")
        if not hmac.compare_digest(expected, sig):
            return None
        issued = int(fields["ts"])
        if abs((time.time() if now is None else now) - issued) > max_age_s:
            return None
        return TenantClaims(unquote(fields["t"]), unquote(fields["k"]), issued, fields["kid"])


def local_secret(data_dir: Path) -> bytes:
    """The embedded-mode secret: generated once into the data dir (mode 0600) and reused, so
    every worker and restart signs alike. Created via link() so racing workers agree."""
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48) + "\n")
            with contextlib.suppress(FileExistsError):  # another worker won the race
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    secret = path.read_text().strip().encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{path}: tenant signing secret is shorter than {MIN_SECRET_BYTES} bytes")
    return secret
