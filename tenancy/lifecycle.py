"""The tenant lifecycle as a table of legal transitions; pure logic, no I/O.

Keeping the rules in one table (rather than `if` chains in the services) lets the stateful
test, the docs and the gateway read the same truth. A trial that runs out becomes its own
status, `trial_expired`, so the gateway can answer 402 from the snapshot alone; `access()`
also treats a `trial` whose end has passed as expired, covering the gap until the scheduler
runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from tenancy.problems import conflict

STATUSES = (
    "trial",
    "trial_expired",
    "active",
    "past_due",
    "suspended",
    "cancelled",
    "deprovisioning",
    "deleted",
)
SERVED = frozenset({"trial", "active", "past_due"})


@dataclass(frozen=True)
class Rule:
    sources: frozenset[str]
    target: str
    event: str


TRANSITIONS: dict[str, Rule] = {
    "activate": Rule(frozenset({"trial", "trial_expired"}), "active", "tenant.activated"),
    "expire_trial": Rule(frozenset({"trial"}), "trial_expired", "tenant.trial_expired"),
    "mark_past_due": Rule(frozenset({"active"}), "past_due", "tenant.past_due"),
    "suspend": Rule(
        frozenset({"trial", "trial_expired", "active", "past_due"}), "suspended",
        "tenant.suspended",
    ),
    "reactivate": Rule(
        frozenset({"past_due", "suspended", "cancelled"}), "active", "tenant.reactivated"
    ),
    "cancel": Rule(
        frozenset({"trial", "trial_expired", "active", "past_due", "suspended"}), "cancelled",
        "tenant.cancelled",
    ),
    "start_deprovisioning": Rule(
        frozenset({"cancelled"}), "deprovisioning", "tenant.deprovisioning_started"
    ),
    "delete": Rule(frozenset({"deprovisioning"}), "deleted", "tenant.deleted"),
}


@dataclass(frozen=True)
class State:
    status: str
    trial_ends_at: datetime | None
    grace_ends_at: datetime | None


@dataclass(frozen=True)
class Change:
    action: str
    before: str
    after: State
    event: str


def initial(trial_days: int, now: datetime) -> State:
    """A new tenant starts in trial when its plan offers one, otherwise active."""
    if trial_days > 0:
        return State("trial", now + timedelta(days=trial_days), None)
    return State("active", None, None)


def transition(state: State, action: str, *, now: datetime, grace_days: int) -> Change:
    """The state after `action`, or a 409 Problem naming why the move is illegal."""
    rule = TRANSITIONS.get(action)
    if rule is None:
        raise conflict(
            f"unknown lifecycle action {action!r}; expected one of {sorted(TRANSITIONS)}",
            action=action,
        )
    if state.status not in rule.sources:
        raise conflict(
            f"cannot {action} a tenant that is {state.status}; allowed from "
            f"{', '.join(sorted(rule.sources))}",
            action=action, tenant_status=state.status,
        )
    trial_ends_at, grace_ends_at = state.trial_ends_at, state.grace_ends_at
    if action == "expire_trial" and trial_ends_at is not None and now < trial_ends_at:
        raise conflict(
            f"the trial runs until {trial_ends_at.isoformat()}", action=action,
            tenant_status=state.status,
        )
    if action == "delete" and (grace_ends_at is None or now < grace_ends_at):
        until = grace_ends_at.isoformat() if grace_ends_at else "unset"
        raise conflict(
            f"the deprovisioning grace period runs until {until}", action=action,
            tenant_status=state.status,
        )
    if action == "start_deprovisioning":
        grace_ends_at = now + timedelta(days=grace_days)
    elif rule.target == "active":
        grace_ends_at = None
    after = State(rule.target, trial_ends_at, grace_ends_at)
    return Change(action, state.status, after, rule.event)


def access(status: str, trial_ends_at: datetime | None, now: datetime) -> int | None:
    """The HTTP status the gateway answers instead of proxying, or None to serve."""
    if status == "trial_expired" or (
        status == "trial" and trial_ends_at is not None and now >= trial_ends_at
    ):
        return 402
    return None if status in SERVED else 403
