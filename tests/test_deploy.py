"""deploy/ is checked against the code it deploys: settings, CLI commands, metric names and
the ClickHouse schema. Nothing here can be built or run (no Docker engine, no Kubernetes,
no ClickHouse cluster), so the tests check what can be checked on this machine: the
Kubernetes API schema, promtool, ClickHouse's own parser, and the cluster DDL run on chDB
with its cluster-only parts taken out."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import shutil
import subprocess
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml
from prometheus_client import REGISTRY

from gateway.cli import app as cli_app
from metering import clickhouse
from metering.migrations import migrate, statements
from tenancy.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
RULES = DEPLOY / "prometheus" / "rules.yaml"
DASHBOARD = DEPLOY / "grafana" / "tollway.json"
CLUSTER_SQL = DEPLOY / "clickhouse" / "cluster.sql"
ANALYST_SQL = DEPLOY / "clickhouse" / "analyst.sql"
K8S_VERSION = "1.32"
SECRET_SETTINGS = {"TOLLWAY_DATABASE_URL", "TOLLWAY_REDIS_URL", "TOLLWAY_CLICKHOUSE_URL",
                   "TOLLWAY_TENANT_SIGNING_KEYS"}
ACCESS_DDL = ("CREATE SETTINGS PROFILE", "ALTER USER", "CREATE ROLE", "GRANT", "CREATE USER",
              "CREATE ROW POLICY")


def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in _yaml_docs(path)]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] in ("Deployment", "Job") else {}
    containers: list[dict[str, Any]] = spec.get("containers", [])
    return containers


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _k8s_docs() if d["kind"] == kind}


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def _tollway_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in _compose()["services"].items()
            if str(svc.get("image", "")).startswith("tollway")}


# --- files parse --------------------------------------------------------------------------


def test_every_yaml_and_json_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {p.relative_to(DEPLOY).as_posix() for p in files} >= {
        "compose.yaml", "k8s/kustomization.yaml", "prometheus/rules.yaml",
        "prometheus/rules.test.yaml",
    }
    for path in files:
        assert _yaml_docs(path), f"{path} is empty"
    assert json.loads(DASHBOARD.read_text())["panels"]


# --- Kubernetes ---------------------------------------------------------------------------


def test_manifests_are_valid_kubernetes_objects() -> None:
    docs = _k8s_docs()
    assert {d["kind"] for d in docs} >= {"Deployment", "Job", "Service", "ConfigMap", "Secret",
                                         "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    broken = json.loads(json.dumps(_by_kind("Deployment")["tollway-gateway"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == files
    assert kustomization["images"][0]["name"] == "tollway"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_into_one_namespace() -> None:
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                           check=True, timeout=60).stdout
    docs = [d for d in yaml.safe_load_all(built) if d]
    assert len(docs) == len(_k8s_docs()) - 1  # all but the Secret example
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "tollway"
        for container in _containers(doc):
            assert container["image"] == "tollway:0.1.0"


def test_secrets_are_secret_refs_and_not_in_the_configmap() -> None:
    config = _by_kind("ConfigMap")["tollway-config"]["data"]
    assert not SECRET_SETTINGS & set(config)
    assert set(_by_kind("Secret")["tollway-secrets"]["stringData"]) == SECRET_SETTINGS
    for doc in _k8s_docs():
        for container in _containers(doc):
            for var in container.get("env", []):
                if var["name"] in SECRET_SETTINGS:
                    ref = var["valueFrom"]["secretKeyRef"]
                    assert ref == {"name": "tollway-secrets", "key": var["name"]}


def test_gateway_probes_autoscaling_and_budgets_point_at_the_right_pods() -> None:
    deployments = _by_kind("Deployment")
    gateway = deployments["tollway-gateway"]
    container = _containers(gateway)[0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"]
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["TOLLWAY_EMBEDDED_WORKER"] == "false"  # consumers and scheduler run elsewhere
    jobs = _containers(deployments["tollway-jobs"])[0]
    jobs_env = {v["name"]: v.get("value") for v in jobs["env"]}
    assert jobs_env["TOLLWAY_EMBEDDED_WORKER"] == "true" and jobs_env["TOLLWAY_WORKERS"] == "1"
    hpa = _by_kind("HorizontalPodAutoscaler")["tollway-gateway"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "tollway-gateway"
    assert "replicas" not in gateway["spec"]  # the HPA owns it; an apply must not reset it
    pod_labels = {name: d["spec"]["template"]["metadata"]["labels"]
                  for name, d in deployments.items()}
    for kind in ("PodDisruptionBudget", "Service"):
        for name, doc in _by_kind(kind).items():
            selector = doc["spec"]["selector"].get("matchLabels", doc["spec"]["selector"])
            matched = [d for d, labels in pod_labels.items() if selector.items() <= labels.items()]
            assert matched, f"{kind} {name} selects no pods"
    for name, doc in deployments.items():
        assert doc["spec"]["selector"]["matchLabels"].items() <= pod_labels[name].items()


# --- settings and commands ----------------------------------------------------------------


def test_every_tollway_variable_is_a_real_setting() -> None:
    known = {"TOLLWAY_" + f.name.upper() for f in dataclasses.fields(Settings)} | {
        "TOLLWAY_CONFIG"}
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [ROOT / "docs" / "deployment.md"]
    used: dict[str, set[str]] = {}
    for path in files:
        for name in re.findall(r"TOLLWAY_[A-Z0-9_]*[A-Z0-9]", path.read_text()):
            used.setdefault(name, set()).add(path.name)
    assert used, "no settings found at all"
    unknown = {name: sorted(where) for name, where in used.items() if name not in known}
    assert not unknown


def test_containers_run_commands_the_cli_has() -> None:
    group = typer.main.get_command(cli_app)
    commands = set(group.commands)  # type: ignore[attr-defined]
    used = {name: svc["command"][0] for name, svc in _tollway_services().items()}
    used |= {f"k8s {c['name']}": c["args"][0] for d in _k8s_docs() for c in _containers(d)}
    assert set(used.values()) >= {"serve", "worker", "migrate"}
    assert set(used.values()) <= commands, used


def test_compose_file_matches_the_compose_specification() -> None:
    """The Compose Specification's JSON schema, as vendored by check-jsonschema."""
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendored.joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert [e.message for e in validator.iter_errors(_compose())] == []
    broken = _compose()
    broken["services"]["gateway"]["depend_on"] = broken["services"]["gateway"].pop("depends_on")
    assert [e.message for e in validator.iter_errors(broken)]


def test_compose_wires_the_production_stores_and_the_start_order() -> None:
    compose = _compose()
    services = compose["services"]
    assert services["redis"]["image"].startswith("redis:7")
    for name, svc in _tollway_services().items():
        env = svc["environment"]
        assert env["TOLLWAY_DATABASE_URL"].startswith("postgresql://"), name
        assert env["TOLLWAY_REDIS_URL"].startswith("redis://redis:"), name
        assert env["TOLLWAY_CLICKHOUSE_URL"].startswith("http://"), name
        for dependency in svc.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    tollway = _tollway_services()
    assert tollway["migrate"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    assert tollway["worker"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully")
    assert tollway["gateway"]["environment"]["TOLLWAY_EMBEDDED_WORKER"] == "false"
    assert tollway["gateway"]["deploy"]["replicas"] >= 2
    upstream = tollway["gateway"]["environment"]["TOLLWAY_UPSTREAM"]
    assert re.match(r"http://(\w+):", upstream)[1] in services  # type: ignore[index]
    nginx = (DEPLOY / "compose" / "nginx.conf").read_text()
    assert "server gateway:8080;" in nginx and "proxy_request_buffering off;" in nginx


def test_dockerfile_installs_every_package_and_runs_tollway_unprivileged() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert stages and all(s == "python:3.11-slim" for s in stages) and len(stages) == 2
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.M))
    assert packages <= copied
    assert project["project"]["readme"] in re.findall(r"^COPY (.+) \./$", text, re.M)[0].split()
    assert "pip wheel --no-cache-dir --wheel-dir /wheels ." in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*/healthz", text, re.M | re.S)
    assert 'ENTRYPOINT ["tollway"]' in text and 'VOLUME ["/var/lib/tollway"]' in text


# --- metrics ------------------------------------------------------------------------------


def _code_metrics() -> dict[str, set[str]]:
    """Every exposition name our packages register (counter `_total`, histogram
    `_bucket/_sum/_count` included) with its label names."""
    for package in ("gateway", "metering", "tenancy", "billing"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "prometheus_client" in path.read_text():
                relative = path.relative_to(ROOT).with_suffix("")
                importlib.import_module(".".join(relative.parts))
    found: dict[str, set[str]] = {}
    # prometheus_client has no public way to list collectors with their label names
    for collector, names in REGISTRY._collector_to_names.items():
        labels = set(getattr(collector, "_labelnames", ()))
        for name in names:
            if name.startswith("tollway_"):
                found[name] = labels | ({"le"} if name.endswith("_bucket") else set())
    return found


def _rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_rules_and_dashboard_use_only_metrics_and_labels_the_code_exports() -> None:
    metrics = _code_metrics()
    assert "tollway_gateway_requests_total" in metrics  # the registry was really populated
    recorded = {rule["record"] for g in yaml.safe_load(RULES.read_text())["groups"]
                for rule in g["rules"] if "record" in rule}
    exprs = _rule_exprs() + _dashboard_exprs()
    used: set[str] = set()
    for expr in exprs:
        names = set(re.findall(r"\btollway_[a-z0-9_]+", expr))
        used |= names
        assert names <= set(metrics), (expr, names - set(metrics))
        assert set(re.findall(r"\btollway:[a-z0-9_:]+", expr)) <= recorded, expr
        allowed = set().union(*(metrics[n] for n in names)) | {"instance", "job", "pod"}
        for _name, matchers in re.findall(r"\b(tollway_[a-z0-9_]+)\{([^}]*)\}", expr):
            assert set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers)) <= metrics[_name], expr
        for grouping in re.findall(r"\bby \(([^)]*)\)", expr):
            labels = {label.strip() for label in grouping.split(",")}
            if names:
                assert labels <= allowed, (expr, labels - allowed)
    # the brief's list of what an operator watches is covered
    assert {"tollway_snapshot_age_seconds", "tollway_usage_spool_bytes",
            "tollway_usage_lag_entries", "tollway_usage_events_dead_lettered_total",
            "tollway_tenant_mismatch_total", "tollway_admission_degraded_total",
            "tollway_admission_redis_failures_total", "tollway_gateway_upstream_errors_total",
            "tollway_usage_insert_seconds_bucket", "tollway_gateway_overhead_seconds_bucket",
            } <= used


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (apt-get install prometheus)")
def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    for args in (["check", "rules", RULES.name], ["test", "rules", "rules.test.yaml"]):
        done = subprocess.run(["promtool", *args], cwd=RULES.parent, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


# --- ClickHouse cluster DDL ---------------------------------------------------------------


def test_every_cluster_statement_parses_in_clickhouse(tmp_path: Path) -> None:
    """ClickHouse's parser on chDB (`EXPLAIN AST`): a syntax error raises, nothing runs."""
    settings = Settings(data_dir=tmp_path, clickhouse_url=f"chdb://{tmp_path / 'parse'}")
    try:
        client = clickhouse.connect(settings)
        for path in (CLUSTER_SQL, ANALYST_SQL):
            found = statements(path.read_text())
            assert found
            for statement in found:
                assert client.query("EXPLAIN AST " + statement).result_rows, statement
    finally:
        clickhouse.close()


def test_cluster_tables_are_replicated_sharded_by_tenant_and_created_on_the_cluster() -> None:
    found = statements(CLUSTER_SQL.read_text())
    for statement in found:
        if not statement.startswith("INSERT"):
            assert "ON CLUSTER '{cluster}'" in statement, statement
    local = {}
    for statement in found:
        match = re.match(r"CREATE TABLE IF NOT EXISTS (\w+) ON CLUSTER", statement)
        if match is None:
            continue
        engine = re.search(r"ENGINE = (\w+)\(", statement)
        assert engine is not None, statement
        assert engine[1].startswith(("Replicated", "Distributed")), statement
        if engine[1].startswith("Replicated"):
            assert re.search(r"Replicated\w+\('/clickhouse/tables/(\{shard\}|all)/\{database\}/"
                             + match[1] + r"', '\{replica\}'\)", statement), statement
            local[match[1]] = statement
    distributed = dict(re.findall(
        r"CREATE TABLE IF NOT EXISTS (\w+) ON CLUSTER '\{cluster\}' AS \w+\s+ENGINE = "
        r"(Distributed\('\{cluster\}', currentDatabase\(\), \w+, cityHash64\(tenant_id\)\))",
        CLUSTER_SQL.read_text()))
    sharded = {name for name in local if name.endswith("_local")}
    assert {f"{name}_local" for name in distributed} == sharded
    for name, engine in distributed.items():
        assert f", {name}_local," in engine
    # every table an analyst may read carries that analyst's row policy
    granted = set(re.findall(r"GRANT ON CLUSTER '\{cluster\}' SELECT ON (\w+) TO",
                             CLUSTER_SQL.read_text()))
    policed = set(re.findall(r"CREATE ROW POLICY IF NOT EXISTS \w+ ON CLUSTER '\{cluster\}' "
                             r"ON (\w+)", ANALYST_SQL.read_text()))
    assert policed == set(distributed) | sharded
    assert policed <= granted


def _declustered(sql: str) -> list[str]:
    """The cluster DDL as a single server would run it: no ON CLUSTER, engines unreplicated,
    Distributed tables and access control left out, `_local` tables under their plain names."""
    out = []
    for statement in statements(sql):
        if statement.startswith(ACCESS_DDL) or "ENGINE = Distributed" in statement:
            continue
        statement = statement.replace(" ON CLUSTER '{cluster}'", "")
        statement = re.sub(r"Replicated(\w*MergeTree)\('[^']*', '\{replica\}'\)", r"\1",
                           statement)
        statement = re.sub(r"\breplicated_deduplication_window\b",
                           "non_replicated_deduplication_window", statement)
        out.append(re.sub(r"\b(\w+)_local\b", r"\1", statement))
    return out


def _schema(client: Any) -> dict[str, tuple[Any, ...]]:
    tables = client.query(
        "SELECT name, engine, create_table_query FROM system.tables "
        "WHERE database = currentDatabase() ORDER BY name").result_rows
    columns = client.query(
        "SELECT table, groupArray((name, type, default_kind, default_expression)) FROM "
        "(SELECT * FROM system.columns WHERE database = currentDatabase() ORDER BY position) "
        "GROUP BY table").result_rows
    by_table = {row[0]: row[1] for row in columns}
    return {name: (engine, query, by_table.get(name)) for name, engine, query in tables}


def test_cluster_schema_run_unreplicated_equals_metering_sql(tmp_path: Path) -> None:
    """Columns, types, defaults, sort keys, partitions, TTLs and view queries all compared
    through ClickHouse's own normalised `create_table_query`, not by reading the text."""
    try:
        single = Settings(data_dir=tmp_path, clickhouse_url=f"chdb://{tmp_path / 'single'}")
        assert migrate(clickhouse.connect(single), single)
        expected = _schema(clickhouse.connect(single))
        cluster = Settings(data_dir=tmp_path, clickhouse_url=f"chdb://{tmp_path / 'cluster'}")
        client = clickhouse.connect(cluster)
        for statement in _declustered(CLUSTER_SQL.read_text()):
            client.command(statement)
        got = _schema(client)
        # `tollway migrate` then finds every version recorded and creates nothing more
        assert migrate(client, cluster) == []
        assert _schema(client) == got
    finally:
        clickhouse.close()
    assert set(expected) >= {"usage_events", "usage_minute", "usage_hour", "usage_day",
                             "usage_minute_mv", "usage_hourly", "usage_daily",
                             "schema_migrations"}
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == expected[name], name
