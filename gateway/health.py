"""Liveness and readiness probes.

/healthz answers as long as the event loop runs, so an orchestrator restarts only a wedged
process. /readyz runs every registered check (the control-plane store, Redis, and whatever the
gateway adds: `snapshot_check` once the proxy is wired) so traffic is withheld from a replica that
could not serve it; each check reports separately so the failing dependency is named.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
import redis
from sqlalchemy import Engine, text
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from gateway.snapshot_refresher import SnapshotRefresher

ReadyCheck = Callable[[], bool]


def store_check(engine: Engine) -> ReadyCheck:
    def check() -> bool:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True

    return check


def redis_check(client: redis.Redis) -> ReadyCheck:
    def check() -> bool:
        return bool(client.ping())

    return check


def snapshot_check(refresher: SnapshotRefresher) -> ReadyCheck:
    """Ready once the first snapshot has loaded. A stale snapshot still serves (the store may
    be down), so its age is a metric, not a readiness condition: it would fail every replica
    at once."""

    def check() -> bool:
        return hasattr(refresher, "snapshot")

    return check


def _run(checks: dict[str, ReadyCheck]) -> dict[str, str]:
    results = {}
    for name, check in checks.items():
        try:
            results[name] = "ok" if check() else "not ready"
        except Exception as exc:  # a probe reports failures, it never raises them
            results[name] = f"error: {type(exc).__name__}"
    return results


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def readyz(request: Request) -> Response:
    checks: dict[str, ReadyCheck] = request.app.state.ready_checks
    results = await run_in_threadpool(_run, checks)
    ready = all(value == "ok" for value in results.values())
    body = {"status": "ready" if ready else "not ready", "checks": results}
    return Response(orjson.dumps(body), status_code=200 if ready else 503,
                    media_type="application/json")
