"""The lifecycle state machine: the pure table, and random walks against the real store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import ClassVar

import hypothesis.strategies as st
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select

from tenancy import lifecycle, plans, tenants
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem
from tenancy.tables import audit_events

T0 = datetime(2026, 1, 1, tzinfo=UTC)

# The lifecycle, written out independently of tenancy.lifecycle as the test oracle.
EXPECTED = {
    ("trial", "activate"): "active",
    ("trial_expired", "activate"): "active",
    ("trial", "expire_trial"): "trial_expired",
    ("active", "mark_past_due"): "past_due",
    **{(s, "suspend"): "suspended" for s in ("trial", "trial_expired", "active", "past_due")},
    **{(s, "reactivate"): "active" for s in ("past_due", "suspended", "cancelled")},
    **{
        (s, "cancel"): "cancelled"
        for s in ("trial", "trial_expired", "active", "past_due", "suspended")
    },
    ("cancelled", "start_deprovisioning"): "deprovisioning",
    ("deprovisioning", "delete"): "deleted",
}
EVENTS = {
    "activate": "tenant.activated",
    "expire_trial": "tenant.trial_expired",
    "mark_past_due": "tenant.past_due",
    "suspend": "tenant.suspended",
    "reactivate": "tenant.reactivated",
    "cancel": "tenant.cancelled",
    "start_deprovisioning": "tenant.deprovisioning_started",
    "delete": "tenant.deleted",
}
ACTIONS = sorted(EVENTS)


def _state(status: str) -> lifecycle.State:
    # Trial over and grace over, so only the table decides.
    return lifecycle.State(status, T0 - timedelta(days=1), T0 - timedelta(days=1))


@pytest.mark.parametrize("status", lifecycle.STATUSES)
@pytest.mark.parametrize("action", ACTIONS)
def test_every_status_action_pair_matches_the_spec(status: str, action: str) -> None:
    expected = EXPECTED.get((status, action))
    if expected is None:
        with pytest.raises(Problem) as err:
            lifecycle.transition(_state(status), action, now=T0, grace_days=30)
        assert err.value.status == 409
        assert action in err.value.detail and status in err.value.detail
    else:
        change = lifecycle.transition(_state(status), action, now=T0, grace_days=30)
        assert change.after.status == expected
        assert change.event == EVENTS[action]


def test_unknown_action_is_a_409_naming_the_valid_ones() -> None:
    with pytest.raises(Problem) as err:
        lifecycle.transition(_state("active"), "explode", now=T0, grace_days=30)
    assert err.value.status == 409 and "activate" in err.value.detail


def test_guards_on_time() -> None:
    trial = lifecycle.initial(14, T0)
    assert trial.status == "trial" and trial.trial_ends_at == T0 + timedelta(days=14)
    assert lifecycle.initial(0, T0).status == "active"
    with pytest.raises(Problem, match="trial runs until"):
        lifecycle.transition(trial, "expire_trial", now=T0, grace_days=30)
    ends = T0 + timedelta(days=14)
    expired = lifecycle.transition(trial, "expire_trial", now=ends, grace_days=30)
    assert expired.after.status == "trial_expired"
    cancelled = lifecycle.State("cancelled", None, None)
    deprov = lifecycle.transition(cancelled, "start_deprovisioning", now=T0, grace_days=30).after
    assert deprov.grace_ends_at == T0 + timedelta(days=30)
    with pytest.raises(Problem, match="grace period runs until"):
        lifecycle.transition(deprov, "delete", now=T0 + timedelta(days=29), grace_days=30)
    gone = lifecycle.transition(deprov, "delete", now=T0 + timedelta(days=30), grace_days=30)
    assert gone.after.status == "deleted"


def test_access_answers_402_for_an_expired_trial_even_before_the_scheduler_runs() -> None:
    ends = T0 + timedelta(days=14)
    assert lifecycle.access("trial", ends, T0) is None
    assert lifecycle.access("trial", ends, ends) == 402
    assert lifecycle.access("trial_expired", ends, T0) == 402
    assert lifecycle.access("active", None, T0) is None
    assert lifecycle.access("past_due", None, T0) is None
    for status in ("suspended", "cancelled", "deprovisioning", "deleted"):
        assert lifecycle.access(status, None, T0) == 403


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 40)), max_size=30))
def test_random_walks_stay_in_the_table(steps: list[tuple[str, int]]) -> None:
    state, now = lifecycle.initial(14, T0), T0
    for action, days in steps:
        now += timedelta(days=days)
        try:
            change = lifecycle.transition(state, action, now=now, grace_days=30)
        except Problem as exc:
            assert exc.status == 409
            continue
        assert EXPECTED[(state.status, action)] == change.after.status
        assert state.status != "deleted"
        state = change.after
        assert state.status in lifecycle.STATUSES
        assert (state.grace_ends_at is not None) == (state.status in ("deprovisioning", "deleted"))


def _audit_count(cp: ControlPlane, tenant_id: str) -> int:
    with cp.engine.connect() as conn:
        query = select(func.count()).where(audit_events.c.tenant_id == tenant_id)
        return int(conn.execute(query).scalar_one())


class StoreLifecycle(RuleBasedStateMachine):
    """Drives one real tenant through random actions and waits on the real store."""

    store: ClassVar[ControlPlane]

    def __init__(self) -> None:
        super().__init__()
        self.cp = cp = self.store
        self.now = T0
        row = tenants.create(
            cp, actor="test", name="Stateful Co", email="s@example.com", now=self.now
        )
        self.tenant_id = row["id"]
        self.status = row["status"]
        self.trial_ends = datetime.fromisoformat(row["trial_ends_at"])
        self.grace_ends: datetime | None = None
        self.moves = 0

    def _row(self) -> dict[str, object]:
        with self.cp.engine.connect() as conn:
            return tenants.get(conn, self.tenant_id)

    @rule(days=st.integers(0, 40))
    def wait(self, days: int) -> None:
        self.now += timedelta(days=days)

    @rule(action=st.sampled_from(ACTIONS))
    def act(self, action: str) -> None:
        expected = EXPECTED.get((self.status, action))
        legal = expected is not None
        if action == "expire_trial":
            legal = legal and self.now >= self.trial_ends
        if action == "delete":
            legal = legal and self.grace_ends is not None and self.now >= self.grace_ends
        before, events_before = self._row(), _audit_count(self.cp, self.tenant_id)
        try:
            after = tenants.transition(
                self.cp, self.tenant_id, action, actor="test", now=self.now
            )
        except Problem as exc:
            assert exc.status == 409, exc.detail
            assert not legal, f"{action} from {self.status} was refused: {exc.detail}"
            assert self._row() == before
            assert _audit_count(self.cp, self.tenant_id) == events_before
            return
        assert legal, f"{action} from {self.status} was allowed"
        assert after["status"] == expected
        self.status = str(expected)
        self.moves += 1
        if action == "start_deprovisioning":
            self.grace_ends = self.now + timedelta(days=self.cp.settings.grace_days)
        if expected == "deleted":
            assert after["subdomain"] is None and after["domains"] == []

    @invariant()
    def store_agrees(self) -> None:
        row = self._row()
        assert row["status"] == self.status
        assert row["status"] in lifecycle.STATUSES
        assert _audit_count(self.cp, self.tenant_id) == 1 + self.moves


def test_random_transition_sequences_against_the_store(cp: ControlPlane) -> None:
    plans.ensure_defaults(cp)

    class OnThisStore(StoreLifecycle):
        store = cp

    run_state_machine_as_test(
        OnThisStore,
        settings=hsettings(max_examples=12, stateful_step_count=25, deadline=None),
    )
