"""Whether a tenant's lifecycle state lets a request through, and if not, what to answer.

A pure function over the snapshot record so the gateway decides without a store query. It is
finer than `tenancy.lifecycle.access`: past_due is served only during the dunning window,
and each refusal says why. The status names are the lifecycle's; a status this module does
not know is treated like a missing tenant (404), never served.
"""

from __future__ import annotations

from gateway.snapshot import TenantRecord
from tenancy.problems import Problem

DAY_S = 86400.0

_CLOSED = {
    "suspended": "the tenant is suspended",
    "cancelled": "the tenant's subscription is cancelled",
    "deprovisioning": "the tenant is being deprovisioned after cancellation",
}


def check_status(tenant: TenantRecord | None, now: float) -> Problem | None:
    """None to serve, otherwise the problem to answer; `now` is epoch seconds."""
    if tenant is None:
        return Problem(404, "no such tenant", kind="tenant-not-found")
    status = tenant.status
    if status == "active":
        return _plan_gate(tenant)
    if status == "trial":
        if tenant.trial_ends_ts is None or now < tenant.trial_ends_ts:
            return _plan_gate(tenant)
        return _trial_expired()
    if status == "trial_expired":
        return _trial_expired()
    if status == "past_due":
        if now < tenant.status_changed_ts + tenant.dunning_days * DAY_S:
            return _plan_gate(tenant)
        return Problem(
            403, f"payment is past due for more than {tenant.dunning_days} days",
            kind="tenant-past-due", tenant_status=status,
        )
    reason = _CLOSED.get(status)
    if reason is not None:
        return Problem(403, reason, kind=f"tenant-{status}", tenant_status=status)
    return Problem(404, "no such tenant", kind="tenant-not-found")


def _plan_gate(tenant: TenantRecord) -> Problem | None:
    """A served tenant whose plan row is missing or unreadable has no limits to enforce."""
    if tenant.plan is None:
        return Problem(503, "the tenant's plan is unavailable", kind="plan-unavailable")
    return None


def _trial_expired() -> Problem:
    return Problem(
        402, "the tenant's trial has ended; choose a paid plan to continue",
        kind="trial-expired", tenant_status="trial_expired",
    )
