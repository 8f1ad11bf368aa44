"""`RateLimit` / `RateLimit-Policy` fields (draft-ietf-httpapi-ratelimit-headers-10/11), the
`Retry-After` of a refusal, and its problem+json body.

Both fields are Structured Field Lists of String items with parameters: the policy field
(`q` quota, `w` window seconds) is fixed per plan, so it is rendered once per `Policy`; the
`RateLimit` field names only the policy closest to exhaustion (`r` remaining, `t` seconds to
reset), which is the one a client needs to pace itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tenancy.problems import TYPE_BASE

if TYPE_CHECKING:
    from gateway.admission import Decision, Limit

RATELIMIT = b"ratelimit"
RATELIMIT_POLICY = b"ratelimit-policy"
RETRY_AFTER = b"retry-after"

_TITLES = {429: "Too Many Requests", 503: "Service Unavailable"}


def policy_field(limits: tuple[Limit, ...]) -> bytes:
    items = []
    for limit in limits:
        item = f'"{limit.name}";q={limit.quota}'
        if limit.window_s:
            item += f";w={limit.window_s}"
        items.append(item)
    return ", ".join(items).encode("ascii")


def _closest(decision: Decision) -> int:
    """Index of the policy with the smallest share of its quota left; -1 if none reported."""
    best, best_share = -1, 2.0
    pairs = zip(decision.policy.limits, decision.remaining, strict=False)
    for i, (limit, left) in enumerate(pairs):
        share = max(left, 0) / limit.quota if limit.quota else 0.0
        if share < best_share:
            best, best_share = i, share
    return best


def headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    """Response headers for a decision, as ASGI (name, value) pairs."""
    out: list[tuple[bytes, bytes]] = []
    limits = decision.policy.limits
    if limits:
        out.append((RATELIMIT_POLICY, decision.policy.policy_field))
    i = _closest(decision) if decision.violated is None else decision.violated_index
    if 0 <= i < len(decision.remaining):
        value = f'"{limits[i].name}";r={max(decision.remaining[i], 0)}'
        reset = decision.reset_s[i]
        if reset is not None:
            value += f";t={reset}"
        out.append((RATELIMIT, value.encode("ascii")))
    if not decision.allowed:
        out.append((RETRY_AFTER, str(decision.retry_after_s).encode("ascii")))
    return out


def problem(decision: Decision) -> dict[str, Any]:
    """The problem+json body of a refused request, naming the policy it violated."""
    status = decision.status
    if status == 503:
        kind, detail = "admission-unavailable", "Admission control is unavailable; retry later."
    elif decision.violated is not None and decision.violated.startswith("quota:"):
        kind = "quota-exceeded"
        detail = f"The monthly quota {decision.violated!r} is exhausted."
    else:
        kind = "rate-limited"
        detail = f"The limit {decision.violated!r} is exceeded; retry after the given delay."
    return {
        "type": TYPE_BASE + kind,
        "title": _TITLES.get(status, "Too Many Requests"),
        "status": status,
        "detail": detail,
        "violated_policy": decision.violated,
        "retry_after": decision.retry_after_s,
    }
