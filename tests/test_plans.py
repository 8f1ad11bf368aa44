"""Plans: strict validation, versioning by digest, defaults, and tenants pinned to versions."""

from __future__ import annotations

import copy
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select

from tenancy import plans, tenants
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem
from tenancy.tables import audit_events
from tenancy.tables import plans as plans_table

PLAN_TOML = """
[plans.team]
name = "Team"
price = "49.50"
currency = "EUR"
interval = "month"
trial_days = 7
users = 25
storage_gb = 20
features = ["api", "webhooks"]

[plans.team.limits]
rate_per_second = 20
burst = 40
concurrency = 16
fail_mode = "open"
local_rate_per_second = 8

[plans.team.quotas]
api_calls = 50_000
ai_interactions = 2_000
"""

BASE: dict[str, Any] = {
    "plans": {
        "team": {
            "name": "Team",
            "price": "49.50",
            "currency": "EUR",
            "interval": "month",
            "trial_days": 7,
            "users": 25,
            "storage_gb": 20,
            "features": ["api", "webhooks"],
            "limits": {
                "rate_per_second": 20,
                "burst": 40,
                "concurrency": 16,
                "fail_mode": "open",
                "local_rate_per_second": 8,
            },
            "quotas": {"api_calls": 50_000, "ai_interactions": 2_000},
        }
    }
}


def _versions(cp: ControlPlane, plan_id: str) -> list[int]:
    with cp.engine.connect() as conn:
        query = select(plans_table.c.version).where(plans_table.c.plan_id == plan_id)
        return sorted(conn.execute(query).scalars())


def _audits(cp: ControlPlane, type_: str) -> int:
    with cp.engine.connect() as conn:
        query = select(func.count()).where(audit_events.c.type == type_)
        return int(conn.execute(query).scalar_one())


def test_defaults_are_seeded_once_with_the_documented_figures(cp: ControlPlane) -> None:
    first = plans.ensure_defaults(cp)
    assert sorted(r["plan_id"] for r in first) == [
        "custom", "enterprise", "professional", "starter",
    ]
    assert plans.ensure_defaults(cp) == []
    with cp.engine.connect() as conn:
        got = {p.plan_id: p for p in plans.list_plans(conn)}
    figures = {
        "starter": (10, 5, 10_000, 1_000, Decimal("29.00")),
        "professional": (100, 50, 100_000, 10_000, Decimal("99.00")),
        "enterprise": (1000, 500, 1_000_000, 100_000, Decimal("299.00")),
    }
    for pid, (users, storage, api, ai, price) in figures.items():
        plan = got[pid]
        assert (plan.users, plan.storage_gb, plan.price) == (users, storage, price)
        assert plan.quotas == {"api_calls": api, "ai_interactions": ai}
        assert plan.version == 1 and plan.interval == "month" and plan.currency == "USD"
    custom = got["custom"]
    assert custom.price is None and custom.quotas == {} and custom.users is None
    assert custom.fail_mode == "closed" and custom.local_rate_per_second is None
    assert got["starter"].trial_days == 14 and got["starter"].fail_mode == "open"
    assert _audits(cp, "plan.version_created") == 4


def test_defaults_never_overwrite_an_operator_version(cp: ControlPlane) -> None:
    plans.ensure_defaults(cp)
    doc = plans.load_document(plans.DEFAULTS_FILE)
    starter = {"plans": {"starter": {**doc["plans"]["starter"], "price": "35.00"}}}
    assert plans.apply(cp, starter, "ops")[0]["version"] == 2
    assert plans.ensure_defaults(cp) == []
    with cp.engine.connect() as conn:
        assert plans.load(conn, "starter").price == Decimal("35.00")


def test_apply_twice_is_one_version_and_a_change_is_the_next(
    cp: ControlPlane, tmp_path: Path
) -> None:
    path = tmp_path / "plans.toml"
    path.write_text(PLAN_TOML)
    assert plans.apply(cp, path, "ops") == [{"plan_id": "team", "version": 1, "created": True}]
    assert plans.apply(cp, str(path), "ops") == [
        {"plan_id": "team", "version": 1, "created": False}
    ]
    # The same content as YAML has the same canonical digest.
    yaml_path = tmp_path / "plans.yaml"
    yaml_path.write_text(yaml.safe_dump(BASE))
    assert plans.apply(cp, yaml_path, "ops")[0]["created"] is False
    assert _versions(cp, "team") == [1]

    path.write_text(PLAN_TOML.replace("burst = 40", "burst = 60"))
    assert plans.apply(cp, path, "ops") == [{"plan_id": "team", "version": 2, "created": True}]
    assert _versions(cp, "team") == [1, 2]
    assert _audits(cp, "plan.version_created") == 2
    with cp.engine.connect() as conn:
        assert plans.load(conn, "team").burst == 60
        v1 = plans.load(conn, "team", 1)
    assert v1.burst == 40 and v1.price == Decimal("49.50") and v1.currency == "EUR"
    assert v1.quotas == {"ai_interactions": 2000, "api_calls": 50000}
    assert v1.local_rate_per_second == 8.0 and v1.features == ("api", "webhooks")


def test_tenants_stay_on_their_version_until_migrated(cp: ControlPlane) -> None:
    plans.apply(cp, BASE, "ops")
    tenant = tenants.create(cp, actor="ops", name="Pinned Ltd", email="p@example.com", plan="team")
    assert (tenant["plan_id"], tenant["plan_version"]) == ("team", 1)
    changed = copy.deepcopy(BASE)
    changed["plans"]["team"]["quotas"]["api_calls"] = 60_000
    plans.apply(cp, changed, "ops")
    with cp.engine.connect() as conn:
        assert tenants.get(conn, tenant["id"])["plan_version"] == 1
    assert tenants.migrate_to_latest(cp, "team", actor="ops") == 1
    assert tenants.migrate_to_latest(cp, "team", actor="ops") == 0
    with cp.engine.connect() as conn:
        assert tenants.get(conn, tenant["id"])["plan_version"] == 2
    assert _audits(cp, "tenant.plan_changed") == 1
    # A tenant can be pinned back to a named version.
    back = tenants.change_plan(cp, tenant["id"], "team", actor="ops", version=1)
    assert back["plan_version"] == 1


def _bad(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = doc["plans"]["team"]
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "field", "words"),
    [
        ("colour", "red", "plans.team", "unknown keys ['colour']"),
        ("limits.burst", -1, "plans.team.limits.burst", "limits.burst must be an integer"),
        ("limits.rate_per_second", 0, "plans.team.limits.rate_per_second", "positive"),
        ("limits.concurrency", 2.5, "plans.team.limits.concurrency", "integer"),
        ("limits.fail_mode", "maybe", "plans.team.limits.fail_mode", "'open' or 'closed'"),
        ("limits.local_rate_per_second", KeyError, "plans.team.limits.local_rate_per_second",
         "needs limits.local_rate_per_second"),
        ("limits.surge", 3, "plans.team.limits", "unknown keys ['surge']"),
        ("limits", KeyError, "plans.team.limits", "[limits] table"),
        ("quotas.api_calls", -5, "plans.team.quotas.api_calls", "quotas.api_calls"),
        ("quotas.Bad-Meter", 5, "plans.team.quotas", "lower-case identifier"),
        ("price", "12.345", "plans.team.price", "more than two decimal places"),
        ("price", "-1", "plans.team.price", "between 0"),
        ("price", "lots", "plans.team.price", "not a decimal amount"),
        ("currency", "EURO", "plans.team.currency", "ISO 4217"),
        ("interval", "week", "plans.team.interval", "interval"),
        ("trial_days", -1, "plans.team.trial_days", "trial_days"),
        ("users", True, "plans.team.users", "users"),
        ("upstream", "ftp://x", "plans.team.upstream", "http(s) URL"),
        ("name", "", "plans.team.name", "name"),
    ],
)
def test_bad_plan_documents_name_the_plan_and_the_field(
    path: str, value: Any, field: str, words: str
) -> None:
    with pytest.raises(Problem) as err:
        plans.parse(_bad(path, value))
    assert err.value.status == 422
    assert "'team'" in err.value.detail and words in err.value.detail
    assert err.value.extra["errors"][0]["field"] == field


def test_bad_documents_and_files(tmp_path: Path) -> None:
    docs: list[dict[str, Any]] = [{}, {"plans": {}}, {"plans": BASE["plans"], "extra": 1}]
    for doc in docs:
        with pytest.raises(Problem) as err:
            plans.parse(doc)
        assert err.value.status == 422
    with pytest.raises(Problem, match="plan id 'Team!'"):
        plans.parse({"plans": {"Team!": BASE["plans"]["team"]}})
    broken = tmp_path / "broken.toml"
    broken.write_text("[plans.team\nname=")
    with pytest.raises(Problem, match="does not parse"):
        plans.load_document(broken)
    with pytest.raises(Problem, match="must end in"):
        plans.load_document(tmp_path / "plans.json")


def test_apply_is_all_or_nothing(cp: ControlPlane) -> None:
    doc = copy.deepcopy(BASE)
    doc["plans"]["broken"] = {**BASE["plans"]["team"], "currency": "XXX1"}
    with pytest.raises(Problem):
        plans.apply(cp, doc, "ops")
    assert _versions(cp, "team") == []
    assert _audits(cp, "plan.version_created") == 0


def test_unknown_plan_is_404_on_load(cp: ControlPlane) -> None:
    with cp.engine.connect() as conn, pytest.raises(Problem) as err:
        plans.load(conn, "nope")
    assert err.value.status == 404
