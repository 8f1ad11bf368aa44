"""Time-driven lifecycle moves: trials that ran out and grace periods that ended.

Each tenant moves in its own transaction through `tenants.transition`, so one bad row never
blocks the rest and a crash mid-run loses nothing: the next run picks up what is still due.
Running twice is harmless because a moved tenant no longer matches the query.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, select

from tenancy import tenants
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem
from tenancy.tables import tenants as tenants_table

log = logging.getLogger("tollway.scheduler")
ACTOR = "system:scheduler"
BATCH = 500


def _due(cp: ControlPlane, where: ColumnElement[bool]) -> list[str]:
    with cp.engine.connect() as conn:
        query = select(tenants_table.c.id).where(where).order_by(tenants_table.c.id)
        return list(conn.execute(query.limit(BATCH)).scalars())


def _sweep(cp: ControlPlane, action: str, where: ColumnElement[bool], now: datetime) -> int:
    moved, skipped = 0, set()
    while ids := [i for i in _due(cp, where) if i not in skipped]:
        for tenant_id in ids:
            try:
                tenants.transition(cp, tenant_id, action, actor=ACTOR, now=now)
                moved += 1
            except Problem as exc:
                # Someone moved the tenant meanwhile (e.g. activated it); that move wins.
                log.info("scheduler skipped %s %s: %s", action, tenant_id, exc.detail)
                skipped.add(tenant_id)
    return moved


def run_once(cp: ControlPlane, now: datetime | None = None) -> dict[str, int]:
    """Expire due trials and delete tenants whose grace period is over."""
    if now is None:
        at = datetime.now(UTC)
    else:
        at = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    t = tenants_table.c
    return {
        "trials_expired": _sweep(
            cp, "expire_trial", (t.status == "trial") & (t.trial_ends_at <= at), at
        ),
        "deleted": _sweep(
            cp, "delete", (t.status == "deprovisioning") & (t.grace_ends_at <= at), at
        ),
    }


def run_forever(
    cp: ControlPlane, interval_s: float, stop: threading.Event | None = None
) -> None:
    """The embedded-mode loop; runs in a thread until `stop` is set."""
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            counts = run_once(cp)
            if any(counts.values()):
                log.info("scheduler run: %s", counts)
        except Exception:
            log.exception("scheduler run failed; retrying in %.0fs", interval_s)
        stop.wait(interval_s)
