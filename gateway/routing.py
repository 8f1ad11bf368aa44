"""Where an admitted request goes, and the route template its usage is recorded under.

Upstream: the tenant's own, else its plan's (both already folded into `TenantRecord.upstream`
by the snapshot), else the process-wide `settings.upstream`; with none of them the gateway
answers 503 `no-upstream`, a configuration gap rather than a failing upstream (502).

Route template: usage events and analytics group by route, so it must never be the raw path
(ids in paths would make one row per request). The template is the longest of the tenant's
route-rule prefixes that matches, else the first path segment plus `/*` when that segment
looks like a word (`/v1/*`, `/orders/*`), else `/*`. A client choosing first segments at
random could still mint templates, so each tenant gets at most MAX_TEMPLATES distinct
first-segment templates per process; later ones are recorded as `/*`.
"""

from __future__ import annotations

import re

from gateway.snapshot import TenantRecord
from tenancy.problems import Problem
from tenancy.settings import Settings

MAX_TEMPLATES = 64
ANY = "/*"
_SEGMENT = re.compile(r"[A-Za-z][A-Za-z0-9_.~-]{0,31}")


def no_upstream() -> Problem:
    return Problem(503, "no upstream is configured for this tenant", kind="no-upstream")


class Routing:
    __slots__ = ("_default", "_seen")

    def __init__(self, settings: Settings) -> None:
        self._default = settings.upstream
        self._seen: dict[str, set[str]] = {}

    def upstream(self, tenant: TenantRecord) -> str | None:
        return tenant.upstream or self._default

    def template(self, tenant: TenantRecord, path: str) -> str:
        """`path` is the decoded, tenant-prefix-free path (`Resolved.path`)."""
        best = ""
        for rule in tenant.routes:
            prefix = rule.prefix
            if len(prefix) > len(best) and prefix != "/" and (
                path == prefix or (path.startswith(prefix) and path[len(prefix)] == "/")
            ):
                best = prefix
        if best:
            return best + ANY
        end = path.find("/", 1)
        segment = path[1:] if end < 0 else path[1:end]
        if not segment:
            return "/"
        if _SEGMENT.fullmatch(segment) is None:
            return ANY
        template = "/" + segment + ANY
        seen = self._seen.get(tenant.id)
        if seen is None:
            seen = self._seen[tenant.id] = set()
        if template in seen:
            return template
        if len(seen) >= MAX_TEMPLATES:
            return ANY
        seen.add(template)
        return template
