"""The scheduler: trial expiry and grace expiry, idempotent, and the embedded loop."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from tenancy import plans, scheduler, tenants
from tenancy.controlplane import ControlPlane
from tenancy.tables import audit_events

T0 = datetime(2026, 5, 1, tzinfo=UTC)


def _status(cp: ControlPlane, tenant_id: str) -> str:
    with cp.engine.connect() as conn:
        return str(tenants.get(conn, tenant_id)["status"])


def _audit_total(cp: ControlPlane) -> int:
    with cp.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(audit_events)).scalar_one())


def _make(cp: ControlPlane, name: str, plan: str | None = None) -> str:
    row = tenants.create(cp, actor="t", name=name, email="s@example.com", plan=plan, now=T0)
    return str(row["id"])


def test_trials_and_grace_periods_expire_once(cp: ControlPlane) -> None:
    plans.ensure_defaults(cp)
    trial = _make(cp, "Trial Co")
    paying = _make(cp, "Paying Co")
    tenants.transition(cp, paying, "activate", actor="t", now=T0)
    enterprise = _make(cp, "Long Trial", plan="enterprise")
    leaving = _make(cp, "Leaving Co")
    for action in ("cancel", "start_deprovisioning"):
        tenants.transition(cp, leaving, action, actor="t", now=T0)

    assert scheduler.run_once(cp, T0 + timedelta(days=13)) == {"trials_expired": 0, "deleted": 0}
    assert scheduler.run_once(cp, T0 + timedelta(days=14)) == {"trials_expired": 1, "deleted": 0}
    assert _status(cp, trial) == "trial_expired"
    assert _status(cp, paying) == "active" and _status(cp, enterprise) == "trial"

    later = T0 + timedelta(days=cp.settings.grace_days)
    assert scheduler.run_once(cp, later) == {"trials_expired": 1, "deleted": 1}
    assert _status(cp, enterprise) == "trial_expired" and _status(cp, leaving) == "deleted"

    audits = _audit_total(cp)
    assert scheduler.run_once(cp, later) == {"trials_expired": 0, "deleted": 0}
    assert scheduler.run_once(cp, later + timedelta(days=365)) == {
        "trials_expired": 0, "deleted": 0,
    }
    assert _audit_total(cp) == audits


def test_run_forever_applies_due_moves_until_stopped(cp: ControlPlane) -> None:
    plans.ensure_defaults(cp)
    past = datetime.now(UTC) - timedelta(days=20)
    tenant_id = tenants.create(cp, actor="t", name="Old Trial", email="o@example.com", now=past)[
        "id"
    ]
    stop = threading.Event()
    worker = threading.Thread(target=scheduler.run_forever, args=(cp, 0.05, stop))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while _status(cp, tenant_id) != "trial_expired" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=5)
    assert not worker.is_alive()
    assert _status(cp, tenant_id) == "trial_expired"
