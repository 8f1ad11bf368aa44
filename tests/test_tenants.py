"""Tenants: onboarding validation, atomic creates, lookups, keyset lists, edits, plans."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from sqlalchemy import func, select

from tenancy import ids, plans, tenants
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem
from tenancy.tables import audit_events, domains
from tenancy.tables import tenants as tenants_table

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)


@pytest.fixture
def seeded(cp: ControlPlane) -> ControlPlane:
    plans.ensure_defaults(cp)
    return cp


def _counts(cp: ControlPlane) -> tuple[int, int, int]:
    with cp.engine.connect() as conn:
        return (
            int(conn.execute(select(func.count()).select_from(tenants_table)).scalar_one()),
            int(conn.execute(select(func.count()).select_from(domains)).scalar_one()),
            int(conn.execute(select(func.count()).select_from(audit_events)).scalar_one()),
        )


def _events(cp: ControlPlane, tenant_id: str) -> list[str]:
    with cp.engine.connect() as conn:
        query = (
            select(audit_events.c.type)
            .where(audit_events.c.tenant_id == tenant_id)
            .order_by(audit_events.c.seq)
        )
        return list(conn.execute(query).scalars())


def _new(cp: ControlPlane, name: str = "ABC Corporation", **kw: Any) -> dict[str, Any]:
    kw.setdefault("email", "ops@example.com")
    return tenants.create(cp, actor="admin:test", name=name, **kw)


def test_slugs_and_ids() -> None:
    assert ids.slugify("ABC Corporation") == "abc-corporation"
    assert ids.slugify("  Café  Ünïcode & Co. ") == "cafe-unicode-co"
    assert ids.slugify("A very long company name indeed") == "a-very-long-company"
    assert ids.slugify("日本") == "tenant"
    tenant_id = ids.new_tenant_id("ABC Corporation")
    assert ids.is_tenant_id(tenant_id) and tenant_id.startswith("abc-corporation-")
    assert len(ids.new_tenant_id("x" * 200)) == ids.ID_MAX == 27


def test_create_stores_everything_and_audits(seeded: ControlPlane) -> None:
    tenant = _new(
        seeded,
        email="Ops@Example.COM",
        region="eu-west-1",
        locale="fr-ca",
        timezone="Europe/Paris",
        currency="eur",
        metadata={"crm": "4711", "tags": ["a", "b"]},
        settings={"branding": {"logo_url": "https://x/logo.png"}, "features": {"beta": True}},
        subdomain="ABC",
        domains=["API.abc.com.", "portal.abc.com"],
        upstream="https://abc.internal:8443",
        now=T0,
    )
    assert ids.is_tenant_id(tenant["id"]) and tenant["id"].startswith("abc-corporation-")
    assert tenant["email"] == "Ops@example.com"
    assert (tenant["locale"], tenant["currency"], tenant["subdomain"]) == ("fr-CA", "EUR", "abc")
    assert tenant["domains"] == ["api.abc.com", "portal.abc.com"]
    assert (tenant["plan_id"], tenant["plan_version"], tenant["status"]) == ("starter", 1, "trial")
    assert tenant["trial_ends_at"] == (T0 + timedelta(days=14)).isoformat()
    with seeded.engine.connect() as conn:
        assert tenants.get(conn, tenant["id"]) == tenant
    assert _events(seeded, tenant["id"]) == ["tenant.created"]


def test_plan_without_trial_starts_active(seeded: ControlPlane) -> None:
    tenant = _new(seeded, plan="custom")
    assert tenant["status"] == "active" and tenant["trial_ends_at"] is None


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"email": "not-an-email"}, "email"),
        ({"email": "a@b"}, "email"),
        ({"name": "AB"}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "bad\x00name"}, "name"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"timezone": "../../etc/passwd"}, "timezone"),
        ({"currency": "ABC"}, "currency"),
        ({"region": "moon-1"}, "region"),
        ({"locale": "english"}, "locale"),
        ({"plan": "platinum"}, "plan"),
        ({"subdomain": "www"}, "subdomain"),
        ({"subdomain": "-bad-"}, "subdomain"),
        ({"subdomain": "a" * 64}, "subdomain"),
        ({"domains": ["not a host"]}, "domains"),
        ({"domains": ["1.2.3.4"]}, "domains"),
        ({"domains": ["acme.localhost"]}, "domains"),
        ({"domains": "abc.com"}, "domains"),
        ({"metadata": {"blob": "x" * 20_000}}, "metadata"),
        ({"metadata": ["not", "an", "object"]}, "metadata"),
        ({"settings": {"theme": "dark"}}, "settings"),
        ({"settings": {"features": {"beta": "yes"}}}, "settings.features"),
        ({"upstream": "file:///etc/passwd"}, "upstream"),
    ],
)
def test_bad_input_is_422_and_writes_nothing(
    sqlite_cp: ControlPlane, kw: dict[str, Any], field: str
) -> None:
    # Validation runs before any store access, so one backend is enough here.
    seeded = sqlite_cp
    plans.ensure_defaults(seeded)
    before = _counts(seeded)
    with pytest.raises(Problem) as err:
        _new(seeded, **kw)
    assert err.value.status == 422, err.value.detail
    assert err.value.extra["errors"][0]["field"] == field
    assert _counts(seeded) == before


def test_duplicate_subdomain_is_409_and_writes_nothing(seeded: ControlPlane) -> None:
    _new(seeded, subdomain="acme")
    before = _counts(seeded)
    with pytest.raises(Problem) as err:
        _new(seeded, name="Other Acme", subdomain="acme")
    assert err.value.status == 409 and "acme" in err.value.detail
    assert _counts(seeded) == before


def test_domain_conflict_mid_create_rolls_back_the_tenant_and_its_audit(
    seeded: ControlPlane,
) -> None:
    _new(seeded, domains=["taken.example.com"])
    before = _counts(seeded)
    with pytest.raises(Problem) as err:
        # The tenant row and its audit event are written before the domains; the conflict
        # on the second domain must take all of it back.
        _new(
            seeded, name="Late Corp", subdomain="late",
            domains=["a.late.com", "taken.example.com"],
        )
    assert err.value.status == 409 and "taken.example.com" in err.value.detail
    assert _counts(seeded) == before
    assert _new(seeded, name="Late Corp", subdomain="late")["subdomain"] == "late"


def test_get_unknown_is_404(seeded: ControlPlane) -> None:
    with seeded.engine.connect() as conn, pytest.raises(Problem) as err:
        tenants.get(conn, "nope-000000")
    assert err.value.status == 404


def test_list_pages_with_a_keyset_cursor_and_filters(seeded: ControlPlane) -> None:
    made = [
        _new(seeded, name=f"Company {i:02d}", email=f"owner{i}@corp{i % 3}.example",
             plan="professional" if i % 4 == 0 else None, now=T0 + timedelta(seconds=i // 2))
        for i in range(23)
    ]
    tenants.transition(seeded, made[5]["id"], "activate", actor="t")
    seen: list[str] = []
    cursor = None
    with seeded.engine.connect() as conn:
        while True:
            page, cursor = tenants.list_tenants(conn, limit=5, cursor=cursor)
            seen += [t["id"] for t in page]
            if cursor is None:
                break
        expected = sorted(made, key=lambda t: (t["created_at"], t["id"]), reverse=True)
        assert seen == [t["id"] for t in expected]

        active, _ = tenants.list_tenants(conn, status="active")
        assert [t["id"] for t in active] == [made[5]["id"]]
        pro, _ = tenants.list_tenants(conn, plan="professional")
        assert {t["id"] for t in pro} == {made[i]["id"] for i in range(0, 23, 4)}
        by_name, _ = tenants.list_tenants(conn, q="COMPANY 1")
        assert {t["name"] for t in by_name} == {f"Company {i}" for i in range(10, 20)}
        by_email, _ = tenants.list_tenants(conn, q="@Corp2.")
        assert len(by_email) == len([i for i in range(23) if i % 3 == 2])
        by_id, _ = tenants.list_tenants(conn, q=made[7]["id"][-6:])
        assert made[7]["id"] in {t["id"] for t in by_id}
        assert tenants.list_tenants(conn, q="100%")[0] == []
        assert tenants.list_tenants(conn, q="company_0")[0] == []
        combined, _ = tenants.list_tenants(conn, q="company", status="trial", limit=200)
        assert len(combined) == 22
        bad_args: list[dict[str, Any]] = [
            {"cursor": "garbage!"}, {"limit": 0}, {"limit": 501}, {"status": "zombie"}, {"q": "ab"},
        ]
        for bad in bad_args:
            with pytest.raises(Problem) as err:
                tenants.list_tenants(conn, **bad)
            assert err.value.status == 422


def test_update_audits_settings_apart_from_other_fields(seeded: ControlPlane) -> None:
    tenant = _new(seeded, subdomain="upd", domains=["a.upd.com"])
    tid = tenant["id"]
    same = tenants.update(seeded, tid, actor="t", name=tenant["name"], timezone="UTC")
    assert same == tenant and _events(seeded, tid) == ["tenant.created"]

    changed = tenants.update(
        seeded, tid, actor="t", name="ABC Corp Renamed", timezone="Asia/Tokyo",
        settings={"features": {"beta": True}},
    )
    assert changed["name"] == "ABC Corp Renamed" and changed["timezone"] == "Asia/Tokyo"
    assert changed["settings"] == {"features": {"beta": True}}
    assert changed["id"] == tid
    assert _events(seeded, tid)[1:] == ["tenant.updated", "tenant.settings_changed"]

    moved = tenants.update(seeded, tid, actor="t", subdomain=None, domains=["b.upd.com"])
    assert moved["subdomain"] is None and moved["domains"] == ["b.upd.com"]
    other = _new(seeded, name="Other Co", subdomain="upd", domains=["a.upd.com"])
    assert other["subdomain"] == "upd"
    with pytest.raises(Problem) as err:
        tenants.update(seeded, tid, actor="t", name="Should Not Stick", domains=["a.upd.com"])
    assert err.value.status == 409
    with seeded.engine.connect() as conn:
        assert tenants.get(conn, tid)["name"] == "ABC Corp Renamed"
    with pytest.raises(Problem) as err:
        tenants.update(seeded, tid, actor="t", subdomain="upd")
    assert err.value.status == 409
    with pytest.raises(Problem) as err:
        tenants.update(seeded, tid, actor="t", email="bad")
    assert err.value.status == 422


def test_change_plan_audits_and_is_idempotent(seeded: ControlPlane) -> None:
    tid = _new(seeded)["id"]
    moved = tenants.change_plan(seeded, tid, "enterprise", actor="t")
    assert (moved["plan_id"], moved["plan_version"]) == ("enterprise", 1)
    tenants.change_plan(seeded, tid, "enterprise", actor="t")
    assert _events(seeded, tid).count("tenant.plan_changed") == 1
    with pytest.raises(Problem) as err:
        tenants.change_plan(seeded, tid, "enterprise", actor="t", version=9)
    assert err.value.status == 422


def test_deleted_tenant_frees_its_names_and_refuses_changes(seeded: ControlPlane) -> None:
    tid = _new(seeded, subdomain="gone", domains=["gone.example.com"], now=T0)["id"]
    for action in ("cancel", "start_deprovisioning"):
        tenants.transition(seeded, tid, action, actor="t", now=T0, reason="customer left")
    with pytest.raises(Problem) as err:
        tenants.change_plan(seeded, tid, "enterprise", actor="t")
    assert err.value.status == 409
    gone = tenants.transition(seeded, tid, "delete", actor="t", now=T0 + timedelta(days=30))
    assert gone["status"] == "deleted" and gone["subdomain"] is None and gone["domains"] == []
    assert _new(seeded, subdomain="gone", domains=["gone.example.com"])["subdomain"] == "gone"
    with pytest.raises(Problem) as err:
        tenants.update(seeded, tid, actor="t", name="Back Again")
    assert err.value.status == 409
    assert _events(seeded, tid) == [
        "tenant.created", "tenant.cancelled", "tenant.deprovisioning_started", "tenant.deleted",
    ]


def test_illegal_transition_is_409_and_changes_nothing(seeded: ControlPlane) -> None:
    tenant = _new(seeded)
    with pytest.raises(Problem) as err:
        tenants.transition(seeded, tenant["id"], "reactivate", actor="t")
    assert err.value.status == 409 and "trial" in err.value.detail
    with seeded.engine.connect() as conn:
        assert tenants.get(conn, tenant["id"]) == tenant
    assert _events(seeded, tenant["id"]) == ["tenant.created"]


@hsettings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_name_gives_a_well_formed_id(name: str) -> None:
    tenant_id = ids.new_tenant_id(name)
    assert ids.is_tenant_id(tenant_id) and len(tenant_id) <= ids.ID_MAX


def _race(count: int, work: Callable[[int], object]) -> list[object]:
    """Run `work(i)` in `count` threads released together; collect results or Problems."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Problem as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_racing_creates_for_one_subdomain_give_one_tenant(seeded: ControlPlane) -> None:
    before = _counts(seeded)
    results = _race(4, lambda i: _new(seeded, name=f"Racer {i}", subdomain="race"))
    won = [r for r in results if isinstance(r, dict)]
    lost = [r for r in results if isinstance(r, Problem)]
    assert len(won) == 1 and len(lost) == 3
    assert all(p.status == 409 for p in lost)
    tenants_n, domains_n, audits_n = _counts(seeded)
    assert (tenants_n, domains_n, audits_n) == (before[0] + 1, before[1], before[2] + 1)


def test_racing_transitions_apply_once(seeded: ControlPlane) -> None:
    tid = _new(seeded)["id"]
    results = _race(4, lambda i: tenants.transition(seeded, tid, "activate", actor=f"t{i}"))
    assert sum(isinstance(r, dict) for r in results) == 1
    assert all(r.status == 409 for r in results if isinstance(r, Problem))
    assert _events(seeded, tid) == ["tenant.created", "tenant.activated"]


def test_search_terms_with_quotes_and_escapes_match_literally(seeded: ControlPlane) -> None:
    odd = _new(seeded, name="O'Brien \\ Sons 100% _x_")
    _new(seeded, name="OXBrien Sons 1000 axa")
    with seeded.engine.connect() as conn:
        for term in ("o'brien \\ sons", "100%", "_x_", "'; drop table tenants; --"):
            found, _ = tenants.list_tenants(conn, q=term)
            expected = [] if term.startswith("'") else [odd["id"]]
            assert [t["id"] for t in found] == expected, term


def test_gateway_settings_are_accepted_and_validated(sqlite_cp) -> None:
    from tenancy import plans, tenants
    from tenancy.problems import Problem

    plans.ensure_defaults(sqlite_cp)
    gateway = {
        "routes": [{"prefix": "/admin", "scopes": ["admin:write"]}],
        "dunning_days": 10,
        "jwks_url": "https://idp.example.com/.well-known/jwks.json",
        "jwt_issuer": "https://idp.example.com/",
        "jwt_audience": "tollway",
    }
    t = tenants.create(sqlite_cp, actor="t", name="Gateway Settings", email="a@example.com",
                       settings=gateway)
    assert t["settings"]["routes"][0]["scopes"] == ["admin:write"]
    for bad in (
        {"routes": [{"prefix": "admin", "scopes": ["a:b"]}]},
        {"routes": [{"prefix": "/x", "scopes": ["Not A Scope"]}]},
        {"dunning_days": -1},
        {"jwks_url": "ftp://x"},
        {"jwks": {"nokeys": 1}},
        {"jwt_issuer": ""},
    ):
        with pytest.raises(Problem) as err:
            tenants.update(sqlite_cp, t["id"], actor="t", settings=bad)
        assert err.value.status == 422
