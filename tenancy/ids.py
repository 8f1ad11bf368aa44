"""Tenant ids: a readable slug of the name plus a random suffix.

Operators read ids in logs and URLs, so the slug keeps them recognisable; the six hex
characters make two tenants with the same name distinct without a lookup. The id never
changes when the tenant is renamed.
"""

from __future__ import annotations

import re
import secrets
import unicodedata

SLUG_MAX = 20
SUFFIX_HEX = 6
ID_MAX = SLUG_MAX + 1 + SUFFIX_HEX
ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,18}[a-z0-9])?-[0-9a-f]{6}$")

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def slugify(name: str) -> str:
    """Lower-case ASCII words joined by `-`, cut to SLUG_MAX without a trailing dash."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = _NON_ALNUM.sub("-", ascii_name.lower()).strip("-")
    slug = slug[:SLUG_MAX].rstrip("-")
    return slug or "tenant"


def new_tenant_id(name: str) -> str:
    return f"{slugify(name)}-{secrets.token_hex(SUFFIX_HEX // 2)}"


def is_tenant_id(value: str) -> bool:
    return ID_RE.fullmatch(value) is not None
