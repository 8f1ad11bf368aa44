"""Bulk onboarding (tenancy.onboarding) and `tollway tenants import`, on SQLite and PostgreSQL."""

from __future__ import annotations

import stat
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, inspect, literal_column, select, table
from typer.testing import CliRunner, Result

from gateway.cli import app
from tenancy import keys, onboarding, plans, tenants
from tenancy.controlplane import ControlPlane
from tenancy.problems import Problem
from tenancy.tables import api_keys, audit_events
from tenancy.tables import tenants as tenants_table


@pytest.fixture
def seeded(cp: ControlPlane) -> ControlPlane:
    plans.ensure_defaults(cp)
    return cp


def _spec(i: int, **kw: Any) -> dict[str, Any]:
    return {"name": f"Bulk Tenant {i}", "email": f"owner{i}@bulk.example", **kw}


def _count(cp: ControlPlane, tbl: Any) -> int:
    with cp.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(tbl)).scalar_one())


def _events(cp: ControlPlane) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    with cp.engine.connect() as conn:
        query = select(audit_events.c.tenant_id, audit_events.c.type).order_by(
            audit_events.c.seq
        )
        for tenant_id, kind in conn.execute(query):
            found.setdefault(tenant_id, []).append(kind)
    return found


def _dump(cp: ControlPlane) -> str:
    out = []
    with cp.engine.connect() as conn:
        for name in inspect(cp.engine).get_table_names():
            rows: list[Any] = list(
                conn.execute(select(literal_column("*")).select_from(table(name)))
            )
            out.append(f"{name}: {rows!r}")
    return "\n".join(out)


def test_onboard_creates_each_tenant_with_a_working_key_and_audit(seeded: ControlPlane) -> None:
    specs = [_spec(i, subdomain=f"bulk{i}", domains=[f"api.bulk{i}.example"]) for i in range(24)]
    reported: list[int] = []
    outcomes = onboarding.onboard(
        seeded, specs, actor="admin:test", progress=lambda o: reported.append(o.index)
    )

    assert sorted(reported) == list(range(24))
    assert [o.index for o in outcomes] == list(range(24))
    assert all(o.problem is None for o in outcomes)
    assert _count(seeded, tenants_table) == 24 and _count(seeded, api_keys) == 24
    events = _events(seeded)
    with seeded.engine.connect() as conn:
        active = keys.active_by_hash(conn)
        for i, outcome in enumerate(outcomes):
            tenant, key, secret = outcome.tenant, outcome.key, outcome.secret
            assert tenant is not None and key is not None and secret is not None
            assert tenant["name"] == f"Bulk Tenant {i}" and tenant["subdomain"] == f"bulk{i}"
            assert tenants.get(conn, tenant["id"])["domains"] == [f"api.bulk{i}.example"]
            assert events[tenant["id"]] == ["tenant.created", "key.created"]
            assert keys.looks_valid(secret)
            assert active[keys.hash_secret(secret)]["id"] == key["id"]
            assert active[keys.hash_secret(secret)]["tenant_id"] == tenant["id"]


def test_a_refused_entry_fails_alone_and_leaves_nothing(seeded: ControlPlane) -> None:
    owner = tenants.create(seeded, actor="admin:test", name="Owner Co", email="o@owner.example",
                           domains=["taken.example"])
    specs = [
        _spec(0),
        _spec(1, email="not-an-email"),
        _spec(2, domains=["taken.example"]),  # refused in the store, after the tenant row
        _spec(3, domains=["twice.example"]),
        _spec(4, domains=["twice.example"]),  # claimed by entry 3 of the same import
        _spec(5, plan="no-such-plan"),
        _spec(6, colour="blue"),
        _spec(7),
        _spec(8, plan=7),  # what a JSON file can hold; refused before the driver sees it
        _spec(9, domains=5),
        _spec(10, domains="one.example"),
    ]
    before_events = _count(seeded, audit_events)
    outcomes = onboarding.onboard(seeded, specs, actor="admin:test")

    refused = {o.index: o.problem for o in outcomes if o.problem is not None}
    assert set(refused) == {1, 2, 4, 5, 6, 8, 9, 10}
    assert {refused[i].extra["errors"][0]["field"] for i in (8, 9, 10)} == {"plan", "domains"}
    assert refused[1] is not None and refused[1].status == 422
    assert refused[1].extra["errors"][0]["field"] == "email"
    assert refused[2] is not None and refused[2].status == 409 and "taken.example" in (
        refused[2].detail)
    assert refused[4] is not None and refused[4].status == 409
    assert refused[4].extra["earlier_entry"] == 3
    assert refused[5] is not None and refused[5].status == 422
    assert refused[6] is not None and "colour" in refused[6].detail
    assert all(o.tenant is None and o.secret is None for o in outcomes if o.index in refused)

    assert _count(seeded, tenants_table) == 1 + 3 and _count(seeded, api_keys) == 3
    assert _count(seeded, audit_events) == before_events + 3 * 2
    with seeded.engine.connect() as conn:
        names = set(conn.execute(select(tenants_table.c.name)).scalars())
        assert tenants.get(conn, owner["id"])["domains"] == ["taken.example"]
    assert names == {"Owner Co", "Bulk Tenant 0", "Bulk Tenant 3", "Bulk Tenant 7"}


def test_without_keys_only_tenants_are_made(seeded: ControlPlane) -> None:
    outcomes = onboarding.onboard(seeded, [_spec(0), _spec(1)], actor="admin:test",
                                  with_keys=False, workers=2)
    assert all(o.tenant is not None and o.key is None and o.secret is None for o in outcomes)
    assert _count(seeded, tenants_table) == 2 and _count(seeded, api_keys) == 0


def test_secrets_are_stored_nowhere_but_as_hashes(seeded: ControlPlane) -> None:
    outcomes = onboarding.onboard(seeded, [_spec(i) for i in range(3)], actor="admin:test")
    store = _dump(seeded)
    for outcome in outcomes:
        assert outcome.secret is not None
        assert keys.hash_secret(outcome.secret) in store
        body = outcome.secret.split("_")[-1]
        for needle in (outcome.secret, body, body[:-keys.CHECKSUM_LEN]):
            assert needle not in store


# import files


def test_read_file_csv_and_jsonl(tmp_path: Path) -> None:
    csv_file = tmp_path / "t.csv"
    csv_file.write_text(
        "\ufeffname,email,plan,subdomain,domain,upstream\r\n"
        "Acme,ops@acme.example,professional,acme,api.acme.example www.acme.example,"
        "http://127.0.0.1:9000\r\n"
        "\r\n"
        '"Globex, Ltd",it@globex.example,,,,\r\n'
    )
    entries = onboarding.read_file(csv_file)
    assert [e.line for e in entries] == [2, 4]
    assert entries[0].spec == {
        "name": "Acme", "email": "ops@acme.example", "plan": "professional",
        "subdomain": "acme", "domains": ["api.acme.example", "www.acme.example"],
        "upstream": "http://127.0.0.1:9000",
    }
    assert entries[1].spec == {"name": "Globex, Ltd", "email": "it@globex.example"}

    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"name": "Acme", "email": "a@acme.example", "domain": "x.example"}\n\n'
                     '{"name": "Initech", "email": "i@initech.example", "timezone": "UTC"}\n')
    entries = onboarding.read_file(jsonl)
    assert [e.line for e in entries] == [1, 3]
    assert entries[0].spec["domains"] == ["x.example"]


def test_malformed_lines_refuse_the_file_with_their_numbers(tmp_path: Path) -> None:
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"name": "Acme", "email": "a@acme.example"}\n{"name": \n[1, 2]\n')
    with pytest.raises(Problem) as caught:
        onboarding.read_file(jsonl)
    assert caught.value.status == 422
    assert [e["field"] for e in caught.value.extra["errors"]] == ["line 2", "line 3"]

    csv_file = tmp_path / "t.csv"
    csv_file.write_text("name,email\nAcme,a@acme.example\nToo,many,cells\n")
    with pytest.raises(Problem) as caught:
        onboarding.read_file(csv_file)
    assert [e["field"] for e in caught.value.extra["errors"]] == ["line 3"]

    csv_file.write_text("name,email,colour\nAcme,a@acme.example,blue\n")
    with pytest.raises(Problem) as caught:
        onboarding.read_file(csv_file)
    assert caught.value.extra["errors"][0]["field"] == "line 1"


# the CLI


@pytest.fixture
def run(seeded: ControlPlane, tmp_path: Path, database_url: str, redis_url: str) -> Any:
    """The CLI on the store `seeded` migrated (the CLI leaves PostgreSQL to `tollway migrate`)."""
    env = {
        "TOLLWAY_CONFIG": None,
        "COLUMNS": "200",
        "TOLLWAY_DATA_DIR": str(tmp_path / "data"),
        "TOLLWAY_DATABASE_URL": database_url,
        "TOLLWAY_REDIS_URL": redis_url,
        "TOLLWAY_CLICKHOUSE_URL": f"chdb://{tmp_path / 'chdb'}",
        "TOLLWAY_CHANGE_CHANNEL": f"tollway:changes:{uuid.uuid4().hex[:8]}",
    }
    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> Result:
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == code, (args, result.output, result.exception)
        return result

    return invoke


CSV = (
    "name,email,plan,subdomain,domain,upstream\n"
    "Acme Inc,ops@acme.example,professional,acme,api.acme.example,http://127.0.0.1:9000\n"
    "Bad Co,not-an-email,starter,,,\n"
    "Globex,it@globex.example,,globex,api.acme.example,\n"
    "Initech,a@initech.example,starter,,,\n"
)


def test_cli_import_writes_secrets_once_to_a_private_file(run: Any, tmp_path: Path) -> None:
    source = tmp_path / "tenants.csv"
    source.write_text(CSV)
    out = tmp_path / "keys.jsonl"
    result = run("tenants", "import", str(source), "--with-keys", "--keys-out", str(out), code=1)

    ids = result.stdout.split()
    assert len(ids) == 2 and ids[0].startswith("acme-inc-") and ids[1].startswith("initech-")
    assert "created 2" in result.stderr and "failed 2" in result.stderr
    assert "line 3: email 'not-an-email' is not valid" in result.stderr
    assert "line 4: domain 'api.acme.example' is claimed by an earlier entry" in result.stderr
    assert "(line 2)" in result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # In commit order (written as each commits, so a crash loses no shown-once secret).
    written = sorted((orjson.loads(line) for line in out.read_text().splitlines()),
                     key=lambda w: int(w["line"]))
    assert [(w["line"], w["tenant_id"]) for w in written] == [(2, ids[0]), (5, ids[1])]
    assert all(keys.looks_valid(w["secret"]) for w in written)
    assert all(w["secret"] not in result.stdout + result.stderr for w in written)

    shown = orjson.loads(run("keys", "list", ids[0], "--json").stdout)["items"]
    assert [k["id"] for k in shown] == [written[0]["key_id"]]
    assert shown[0]["prefix"] == written[0]["secret"][:12]

    before = out.read_bytes()
    again = run("tenants", "import", str(source), "--with-keys", "--keys-out", str(out), code=2)
    assert "refusing to overwrite" in again.stderr and again.stdout == ""
    assert out.read_bytes() == before
    listed = orjson.loads(run("tenants", "list", "--json").stdout)["items"]
    assert len(listed) == 2


def test_cli_import_jsonl_with_json_prints_secrets_and_checks_its_options(
    run: Any, tmp_path: Path
) -> None:
    source = tmp_path / "tenants.jsonl"
    source.write_text(
        '{"name": "Acme Inc", "email": "ops@acme.example", "domains": ["api.acme.example"]}\n'
        '{"name": "Globex", "email": "it@globex.example", "plan": "enterprise", '
        '"subdomain": "globex"}\n'
    )
    doc = orjson.loads(run("tenants", "import", str(source), "--with-keys", "--json").stdout)
    assert doc["created"] == 2 and doc["failed"] == 0 and doc["failures"] == []
    assert [t["line"] for t in doc["tenants"]] == [1, 2]
    assert all(keys.looks_valid(t["secret"]) for t in doc["tenants"])
    assert all(t["secret"].startswith(t["key_prefix"]) for t in doc["tenants"])

    refused = run("tenants", "import", str(source), "--with-keys", code=2)
    assert "--keys-out" in refused.stderr and refused.stdout == ""
    run("tenants", "import", str(source), "--keys-out", str(tmp_path / "k"), code=2)
    assert not (tmp_path / "k").exists()

    plain = orjson.loads(run("tenants", "import", str(source), "--json", code=1).stdout)
    assert plain["created"] == 0 and plain["failed"] == 2
    assert {f["problem"]["status"] for f in plain["failures"]} == {409}


def test_cli_import_malformed_line_names_it_and_writes_nothing(run: Any, tmp_path: Path) -> None:
    source = tmp_path / "tenants.jsonl"
    source.write_text('{"name": "Acme Inc", "email": "ops@acme.example"}\n{oops}\n')
    keys_out = tmp_path / "keys.jsonl"
    result = run("tenants", "import", str(source), "--with-keys", "--keys-out", str(keys_out),
                 code=1)
    assert "1 malformed line(s); nothing was imported" in result.stderr
    assert "line 2" in result.stderr and not keys_out.exists()
    problem = orjson.loads(run("tenants", "import", str(source), "--json", code=1).stdout)
    assert problem["status"] == 422 and problem["errors"][0]["field"] == "line 2"
    assert orjson.loads(run("tenants", "list", "--json").stdout)["items"] == []
