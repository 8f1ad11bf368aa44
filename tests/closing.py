"""Tenants in a given lifecycle state, for tests of what a closed tenant may no longer do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tenancy import plans, tenants
from tenancy.controlplane import ControlPlane

CLOSING = {
    "cancelled": ("cancel",),
    "deprovisioning": ("cancel", "start_deprovisioning"),
    "deleted": ("cancel", "start_deprovisioning", "delete"),
}


def close(cp: ControlPlane, tenant_id: str, status: str) -> None:
    after_grace = datetime.now(UTC) + timedelta(days=cp.settings.grace_days + 1)
    for action in CLOSING[status]:
        when = after_grace if action == "delete" else None
        tenants.transition(cp, tenant_id, action, actor="test", now=when)


def make_tenant(cp: ControlPlane, status: str | None = None) -> str:
    plans.ensure_defaults(cp)
    tenant = tenants.create(cp, actor="test", name="Acme", email="ops@acme.example.com")
    tenant_id: str = tenant["id"]
    if status is not None:
        close(cp, tenant_id, status)
    return tenant_id
