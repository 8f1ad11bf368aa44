"""The full gateway as a benchmark target: stores, tenants and keys in a temp dir, and the
ASGI factory granian serves.

    .venv/bin/python benchmarks/gateway_target.py serve [--dir DIR] [--port 8080]

`prepare` builds what a real deployment has, small: a migrated SQLite control plane with the
default plans plus two benchmark plans, tenants with one API key each, and Redis on loopback
in its own database (flushed first). Most tenants are on `bench`, whose limits are far above
anything two cores can offer, so every request still runs the whole admission script but is
never throttled; a few are on `bench-tight` and go over their limits, for the locust mix.
The secrets land in `keys.json` (mode 0600, the temp dir only) for locust, and in a wrk Lua
script that rotates `X-API-Key` over the unthrottled tenants.

`app` is the granian factory: it opens the store named by the environment and serves
`gateway.gateway.Gateway` behind a lifespan that starts and closes it. `BENCH_ACCESS_LOG=0`
silences the gateway's per-request access line, to measure what that line costs;
`BENCH_STALLS=1` prints every event-loop stall and garbage collection over 20 ms to stderr,
to find what trips admission's Redis timeout under load. `serve`
prepares a dir and runs granian on it with the serving options docs/performance.md recommends, until
Ctrl-C, so locust has something to point at.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from tenancy import keys, plans, tenants  # noqa: E402
from tenancy.controlplane import ControlPlane  # noqa: E402
from tenancy.settings import load_settings  # noqa: E402
from tenancy.store import migrate, open_engine  # noqa: E402

KEY_HEADER = "X-API-Key"
ACCESS_LOGGER = "tollway.access"
# The loopback Redis in a database of its own. Other jobs share that server, and one slow
# script of theirs stalls every client; bench_proxy.py starts a private server instead.
SHARED_REDIS = "redis://127.0.0.1:6379/13"
ACTOR = "bench:gateway_target"
BENCH_PLANS: dict[str, Any] = {"plans": {
    "bench": {
        "name": "Benchmark (unthrottled)", "trial_days": 0,
        "limits": {"rate_per_second": 1_000_000, "burst": 1_000_000, "concurrency": 100_000,
                   "fail_mode": "closed"},
        "quotas": {"api_calls": 10**15},
    },
    "bench-tight": {
        "name": "Benchmark (tight)", "trial_days": 0,
        "limits": {"rate_per_second": 2, "burst": 5, "concurrency": 4, "fail_mode": "closed"},
        "quotas": {"api_calls": 10**15},
    },
}}
# What docs/performance.md recommends for the gateway's granian (see benchmarks/RESULTS.md).
SERVE_OPTIONS = ("--loop", "uvloop", "--runtime-mode", "st", "--http", "1", "--no-access-log")

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


@dataclass(frozen=True)
class Prepared:
    env: dict[str, str]  # TOLLWAY_* for the gateway's worker processes
    keys: list[str]  # secrets of the unthrottled tenants
    keys_file: Path
    wrk_script: Path


def prepare(
    workdir: Path, *, upstream: str, tenants_count: int = 50, tight_count: int = 5,
    redis_url: str = SHARED_REDIS,
) -> Prepared:
    """Stores, tenants and keys under `workdir`; the Redis database is flushed first."""
    home = workdir / "gateway"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "TOLLWAY_DATA_DIR": str(home),
        "TOLLWAY_DATABASE_URL": f"sqlite:///{home / 'control.sqlite'}",
        "TOLLWAY_REDIS_URL": redis_url,
        "TOLLWAY_UPSTREAM": upstream,
        "TOLLWAY_TENANT_SIGNING_KEYS": secrets.token_hex(32),
        "TOLLWAY_LOG_LEVEL": "warning",
    }
    settings = load_settings(env=env)
    redis.Redis.from_url(env["TOLLWAY_REDIS_URL"]).flushdb()
    engine = open_engine(settings.effective_database_url)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    cp = ControlPlane.open(settings)
    try:
        plans.ensure_defaults(cp, actor=ACTOR)
        plans.apply(cp, BENCH_PLANS, actor=ACTOR)
        rows = [_tenant(cp, i, "bench") for i in range(tenants_count)]
        rows += [_tenant(cp, i, "bench-tight") for i in range(tight_count)]
    finally:
        cp.close()
    keys_file = home / "keys.json"
    keys_file.touch(mode=0o600)
    keys_file.write_text(json.dumps({"header": KEY_HEADER, "tenants": rows}, indent=1))
    unthrottled = [row["key"] for row in rows if row["plan"] == "bench"]
    wrk_script = home / "rotate_keys.lua"
    wrk_script.write_text(_wrk_lua(unthrottled))
    return Prepared(env, unthrottled, keys_file, wrk_script)


def _tenant(cp: ControlPlane, i: int, plan: str) -> dict[str, str]:
    record = tenants.create(
        cp, actor=ACTOR, name=f"{plan} tenant {i}", email=f"{plan}-{i}@bench.tollway.dev",
        plan=plan,
    )
    _key, secret = keys.create(cp, record["id"], actor=ACTOR, name="bench")
    return {"tenant_id": record["id"], "plan": plan, "key": secret}


def _wrk_lua(secrets_: list[str]) -> str:
    """Pre-formatted requests, one per key, cycled, and a count of response statuses printed
    at the end (`statuses: 200=n 503=n`), so a refusal is never mistaken for throughput."""
    listed = ",\n".join(f'  "{s}"' for s in secrets_)
    return (
        f"local keys = {{\n{listed}\n}}\n"
        "local threads = {}\n"
        "setup = function(thread) table.insert(threads, thread) end\n"
        "init = function(args)\n"
        "  requests, counts, i = {}, {}, 0\n"
        "  for n, key in ipairs(keys) do\n"
        f'    requests[n] = wrk.format("GET", "/", {{["{KEY_HEADER}"] = key}})\n'
        "  end\n"
        "end\n"
        "request = function()\n"
        "  i = i % #requests + 1\n"
        "  return requests[i]\n"
        "end\n"
        "response = function(status, headers, body)\n"
        "  counts[status] = (counts[status] or 0) + 1\n"
        "end\n"
        "done = function(summary, latency, requests)\n"
        "  local total = {}\n"
        "  for _, thread in ipairs(threads) do\n"
        '    for status, n in pairs(thread:get("counts")) do\n'
        "      total[status] = (total[status] or 0) + n\n"
        "    end\n"
        "  end\n"
        '  local line = "statuses:"\n'
        '  for status, n in pairs(total) do line = line .. " " .. status .. "=" .. n end\n'
        "  print(line)\n"
        "end\n"
    )


def app() -> ASGIApp:
    """granian's factory target: the Gateway over the stores the environment names."""
    from gateway.gateway import Gateway

    settings = load_settings()
    engine = open_engine(settings.effective_database_url)
    gateway = Gateway.from_settings(settings, engine)
    if os.environ.get("BENCH_ACCESS_LOG", "1") == "0":
        logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)

    async def serve(scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await gateway(scope, receive, send)
            return
        await receive()  # startup
        await gateway.start()
        if os.environ.get("BENCH_STALLS") == "1":
            watch_stalls()
        await send({"type": "lifespan.startup.complete"})
        await receive()  # shutdown
        await gateway.close()
        engine.dispose()
        await send({"type": "lifespan.shutdown.complete"})

    return serve


STALL_MS = 20.0
_stall_tasks: set[asyncio.Task[None]] = set()


def watch_stalls() -> None:
    """Report loop stalls (a 5 ms sleep that overshoots by STALL_MS) and long GC passes."""
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            ms = (time.perf_counter() - started[0]) * 1000
            if ms > STALL_MS:
                print(f"gc gen{info['generation']}: {ms:.1f} ms", file=sys.stderr, flush=True)

    async def loop_lag() -> None:
        while True:
            began = time.perf_counter()
            await asyncio.sleep(0.005)
            late = (time.perf_counter() - began) * 1000 - 5
            if late > STALL_MS:
                print(f"loop stall: {late:.1f} ms", file=sys.stderr, flush=True)

    gc.callbacks.append(on_gc)
    task = asyncio.get_running_loop().create_task(loop_lag())
    _stall_tasks.add(task)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the full gateway for load tests.")
    sub = parser.add_subparsers(dest="mode", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--dir", type=Path, help="work dir (default: a new temp dir)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--upstream", default="http://127.0.0.1:18091")
    serve.add_argument("--tenants", type=int, default=50)
    serve.add_argument("--tight", type=int, default=5)
    serve.add_argument("--redis-url", default=SHARED_REDIS)
    args = parser.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="tollway-gateway-"))
    prepared = prepare(workdir, upstream=args.upstream, tenants_count=args.tenants,
                       tight_count=args.tight, redis_url=args.redis_url)
    print(f"keys: {prepared.keys_file}\nwrk script: {prepared.wrk_script}", flush=True)
    granian = str(Path(sys.executable).parent / "granian")
    command = [granian, "--interface", "asgi", "--factory", "--no-ws", "--workers",
               str(args.workers), "--host", "127.0.0.1", "--port", str(args.port),
               "--log-level", "warning", *SERVE_OPTIONS, "benchmarks.gateway_target:app"]
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **prepared.env})
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=15)


if __name__ == "__main__":
    main()
