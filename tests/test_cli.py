"""The `tollway` CLI in-process through CliRunner, on a tmp data dir and the test Redis."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import typer
from typer.testing import CliRunner, Result

from gateway.cli import app

ID_LINE = re.compile(r"^[a-z0-9][a-z0-9-]*\n$")


@pytest.fixture
def run(tmp_path: Path, redis_url: str) -> Any:
    base_env: dict[str, str | None] = {
        "TOLLWAY_CONFIG": None,
        "TOLLWAY_JOBS_IN_PROCESS": None,
        "COLUMNS": "250",
        "TOLLWAY_DATA_DIR": str(tmp_path / "data"),
        "TOLLWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'control.db'}",
        "TOLLWAY_REDIS_URL": redis_url,
        "TOLLWAY_CLICKHOUSE_URL": f"chdb://{tmp_path / 'chdb'}",
        "TOLLWAY_CHANGE_CHANNEL": f"tollway:changes:{uuid.uuid4().hex[:8]}",
    }
    runner = CliRunner()

    def invoke(*args: str, code: int = 0, env: dict[str, str] | None = None) -> Result:
        result = runner.invoke(app, list(args), env={**base_env, **(env or {})})
        assert result.exit_code == code, (args, result.output, result.exception)
        return result

    return invoke


def _json(result: Result) -> Any:
    return orjson.loads(result.stdout)


def test_every_command_takes_json() -> None:
    def walk(command: Any, path: str) -> list[str]:
        if hasattr(command, "commands"):
            return [p for name, sub in command.commands.items()
                    for p in walk(sub, f"{path} {name}")]
        return [path] if not any("--json" in p.opts for p in command.params) else []

    missing = walk(typer.main.get_command(app), "tollway")
    assert missing == []


def test_tenant_commands(run: Any) -> None:
    created = run("tenants", "create", "Acme Inc", "--email", "ops@acme.example",
                  "--plan", "professional", "--upstream", "http://127.0.0.1:9000",
                  "--domain", "api.acme.example")
    assert ID_LINE.match(created.stdout), created.stdout
    tid = created.stdout.strip()

    doc = _json(run("tenants", "create", "Globex", "--email", "g@globex.example", "--json"))
    assert doc["name"] == "Globex" and doc["plan_id"] == "starter"

    shown = _json(run("tenants", "show", tid, "--json"))
    assert shown["domains"] == ["api.acme.example"] and shown["upstream"] == "http://127.0.0.1:9000"
    assert "Acme Inc" in run("tenants", "show", tid).stdout

    page = _json(run("tenants", "list", "--json", "--limit", "1"))
    assert len(page["items"]) == 1 and page["next_cursor"]
    rest = _json(run("tenants", "list", "--json", "--cursor", page["next_cursor"]))
    assert {t["id"] for t in page["items"] + rest["items"]} == {tid, doc["id"]}
    assert [t["id"] for t in _json(run("tenants", "list", "--q", "acme", "--json"))["items"]] \
        == [tid]
    assert "Globex" in run("tenants", "list").stdout

    assert _json(run("tenants", "activate", tid, "--json"))["status"] == "active"
    assert _json(run("tenants", "suspend", tid, "--reason", "unpaid", "--json"))["status"] \
        == "suspended"
    assert run("tenants", "reactivate", tid).stdout.strip() == f"{tid}: active"
    moved = _json(run("tenants", "set-plan", tid, "enterprise", "--json"))
    assert moved["plan_id"] == "enterprise"
    assert _json(run("tenants", "cancel", tid, "--json"))["status"] == "cancelled"


def test_key_commands(run: Any) -> None:
    tid = run("tenants", "create", "Keyholder", "--email", "k@example.com").stdout.strip()
    secret_line = run("keys", "create", tid, "--name", "ci").stdout
    assert re.fullmatch(r"tw_live_[0-9A-Za-z]{49}\n", secret_line)

    made = _json(run("keys", "create", tid, "--mode", "test", "--scope", "usage:read", "--json"))
    assert made["secret"].startswith("tw_test_") and made["scopes"] == ["usage:read"]

    listed = _json(run("keys", "list", tid, "--json"))["items"]
    assert len(listed) == 2 and all("secret" not in k for k in listed)
    rotated = _json(run("keys", "rotate", made["id"], "--overlap-hours", "1", "--json"))
    assert rotated["secret"] != made["secret"] and rotated["rotated_from"] == made["id"]
    revoked = _json(run("keys", "revoke", rotated["id"], "--json"))
    assert revoked["revoked_at"] is not None
    assert made["id"] in run("keys", "list", tid).stdout


def test_plan_and_token_commands(run: Any, tmp_path: Path) -> None:
    names = {p["plan_id"] for p in _json(run("plans", "list", "--json"))["items"]}
    assert {"starter", "professional", "enterprise"} <= names
    assert _json(run("plans", "show", "starter", "--json"))["plan_id"] == "starter"
    assert "Starter" in run("plans", "show", "starter").stdout

    plan_file = tmp_path / "plans.yaml"
    plan_file.write_text("plans:\n  gold:\n    name: Gold\n    price: '10.00'\n"
                         "    currency: EUR\n    limits: {rate_per_second: 5, burst: 10,"
                         " concurrency: 2, fail_mode: closed}\n")
    applied = _json(run("plans", "apply", str(plan_file), "--json"))
    assert applied["plans"] == [{"plan_id": "gold", "version": 1, "created": True}]
    assert "gold" in run("plans", "apply", str(plan_file)).stdout
    assert "gold" in run("plans", "list").stdout

    token = _json(run("admin-tokens", "create", "--name", "ops", "--json"))
    assert token["secret"].startswith("twadm_") and token["role"] == "platform"
    line = run("admin-tokens", "create", "--name", "ops2").stdout
    assert re.fullmatch(r"twadm_[0-9A-Za-z]{49}\n", line)
    assert len(_json(run("admin-tokens", "list", "--json"))["items"]) == 2


def test_migrate_and_demo(run: Any) -> None:
    migrated = _json(run("migrate", "--json"))
    assert migrated["control_plane"]["backend"] == "sqlite"
    assert migrated["control_plane"]["revision"]
    assert migrated["clickhouse"]["backend"] == "chdb" and migrated["clickhouse"]["applied"]
    again = _json(run("migrate", "--json"))
    assert again["clickhouse"]["applied"] == []

    result = _json(run("demo", "--json"))
    assert result["gateway"].startswith("http://127.0.0.1:")
    assert result["admin_token"].startswith("twadm_")  # first start of this data dir
    demo = result["tenants"]
    assert {t["plan"] for t in demo} == {"starter", "professional", "demo-metered"}
    assert all(t["secret"].startswith("tw_live_") for t in demo)
    assert len(_json(run("tenants", "list", "--json"))["items"]) == 3
    traffic = {t["plan"]: t for t in result["traffic"]}
    # The tight plan runs out of its monthly quota of 25 calls; the rest is refused with 429
    # (a few may meet its concurrency limit of 8 first: refusals consume nothing).
    tight = traffic["demo-metered"]
    assert tight["allowed"] == 25 and tight["limited"] == 61 - 25
    assert tight["limited_by"]["quota:api_calls"] > 0
    assert set(tight["limited_by"]) <= {"quota:api_calls", "concurrency"}
    for t in traffic.values():
        assert t["other"] == 0
        # What ClickHouse metered is exactly what the gateway let through.
        assert Decimal(t["metered"]["api_calls"]) == t["allowed"]

    starter = next(t for t in demo if t["plan"] == "starter")["tenant_id"]
    report = _json(run("usage", "totals", starter, "--json"))
    assert report["plan"] == "starter"
    assert Decimal(report["totals"]["api_calls"]) == traffic["starter"]["allowed"]
    assert {q["meter"]: q["limit"] for q in report["quotas"]}["api_calls"] == 10_000
    assert "api_calls" in run("usage", "totals", starter, "--period", "2026-01").stdout
    run("usage", "totals", starter, "--period", "January", code=2)


def test_errors_and_exit_codes(run: Any) -> None:
    missing = run("tenants", "show", "nobody", code=1)
    assert "does not exist" in missing.stderr and missing.stdout == ""
    problem = _json(run("tenants", "show", "nobody", "--json", code=1))
    assert problem["status"] == 404
    invalid = _json(run("tenants", "create", "Bad", "--email", "nope", "--json", code=1))
    assert invalid["status"] == 422 and invalid["errors"][0]["field"] in {"name", "email"}
    run("tenants", "create", "No Email", code=2)
    run("keys", "create", "t", "--expires-at", "tomorrow", code=2)


def test_configuration_errors_exit_2(run: Any, tmp_path: Path) -> None:
    bad = run("tenants", "list", code=2, env={"TOLLWAY_PORT": "eighty"})
    assert "TOLLWAY_PORT" in bad.stderr
    config = tmp_path / "tollway.toml"
    config.write_text("[tollway]\nno_such_setting = 1\n")
    assert "no_such_setting" in run("--config", str(config), "plans", "list", code=2).stderr


def test_worker_runs_until_sigterm(tmp_path: Path, redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    env.update({
        "TOLLWAY_DATA_DIR": str(tmp_path / "data"), "TOLLWAY_REDIS_URL": redis_url,
        "TOLLWAY_CLICKHOUSE_URL": f"chdb://{tmp_path / 'chdb'}",
        "PYTHONPATH": str(Path(__file__).parents[1]), "PYTHONUNBUFFERED": "1",
    })
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker", "--json",
                             "--metrics-port", "0"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        assert proc.stderr is not None
        while b"metering worker" not in proc.stderr.readline():
            assert time.monotonic() < deadline and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, _err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        started = orjson.loads(out)
        assert started["worker"] == "started" and started["backends"]["analytics"] == "chdb"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
