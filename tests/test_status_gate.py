"""The lifecycle gate: which tenant states are served and what the others are told."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.snapshot import TenantRecord, load_snapshot
from gateway.status_gate import DAY_S, check_status
from tenancy import lifecycle, plans, tenants
from tenancy.controlplane import ControlPlane

NOW = 2_000_000_000.0


@pytest.fixture
def record(sqlite_cp: ControlPlane) -> TenantRecord:
    """A real tenant record from a loaded snapshot, varied per case with dataclasses.replace."""
    plans.ensure_defaults(sqlite_cp)
    tenant = tenants.create(sqlite_cp, actor="test", name="Acme", email="ops@example.com")
    return load_snapshot(sqlite_cp.engine).tenants[tenant["id"]]


def at(record: TenantRecord, status: str, **kw: float | int | None) -> TenantRecord:
    return dataclasses.replace(record, status=status, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "fields", "expected"),
    [
        ("active", {}, None),
        ("trial", {"trial_ends_ts": NOW + 1}, None),
        ("trial", {"trial_ends_ts": None}, None),
        ("trial", {"trial_ends_ts": NOW}, 402),
        ("trial", {"trial_ends_ts": NOW - 1}, 402),
        ("trial_expired", {}, 402),
        ("past_due", {"status_changed_ts": NOW - 6 * DAY_S}, None),
        ("past_due", {"status_changed_ts": NOW - 7 * DAY_S}, 403),
        ("past_due", {"status_changed_ts": NOW - 2 * DAY_S, "dunning_days": 1}, 403),
        ("past_due", {"status_changed_ts": NOW - 20 * DAY_S, "dunning_days": 30}, None),
        ("suspended", {}, 403),
        ("cancelled", {}, 403),
        ("deprovisioning", {}, 403),
        ("deleted", {}, 404),
        ("frozen", {}, 404),
    ],
)
def test_status_answers(
    record: TenantRecord, status: str, fields: dict[str, float | int | None], expected: int | None
) -> None:
    problem = check_status(at(record, status, **fields), NOW)
    assert (problem and problem.status) == expected
    if problem is not None and problem.status == 403:
        assert problem.detail and problem.body()["tenant_status"] == status


def test_unknown_tenant_is_404() -> None:
    problem = check_status(None, time.time())
    assert problem is not None and problem.status == 404


def test_a_served_tenant_without_a_plan_is_not_served(record: TenantRecord) -> None:
    problem = check_status(dataclasses.replace(record, status="active", plan=None), NOW)
    assert problem is not None and problem.status == 503


def test_a_new_tenant_is_served(record: TenantRecord) -> None:
    assert record.status == "trial"
    assert check_status(record, time.time()) is None


def test_agrees_with_the_lifecycle_and_never_serves_a_closed_state(
    record: TenantRecord,
) -> None:
    @settings(max_examples=200, deadline=None)
    @given(
        status=st.sampled_from([*lifecycle.STATUSES, "bogus"]),
        trial_offset=st.one_of(st.none(), st.floats(-1e7, 1e7)),
        changed_ago=st.floats(0, 1e8),
        dunning=st.integers(0, 90),
    )
    def check(status: str, trial_offset: float | None, changed_ago: float, dunning: int) -> None:
        trial_ends = None if trial_offset is None else NOW + trial_offset
        candidate = dataclasses.replace(
            record, status=status, dunning_days=dunning, status_changed_ts=NOW - changed_ago,
            trial_ends_ts=trial_ends,
        )
        problem = check_status(candidate, NOW)
        coarse = lifecycle.access(
            status, None if trial_ends is None else datetime.fromtimestamp(trial_ends, UTC),
            datetime.fromtimestamp(NOW, UTC),
        )
        if problem is None:
            assert status in lifecycle.SERVED and coarse is None
        elif coarse == 402:
            assert problem.status == 402
        elif coarse == 403:
            assert problem.status == 403 or (problem.status == 404 and status not in _WITH_REASON)
        else:  # served by the coarse rule: only dunning can refuse it
            assert status == "past_due" and changed_ago >= dunning * DAY_S
            assert problem.status == 403

    check()


_WITH_REASON = frozenset({"suspended", "cancelled", "deprovisioning"})
