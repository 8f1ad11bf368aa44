"""What the gateway adds per request, measured in-process.

    .venv/bin/python benchmarks/bench_gateway_overhead.py [-n 5000] [-c 1 16]

Starts a fast upstream (benchmarks/upstream.py on granian, one worker) and a private
redis-server, creates a tenant with a key on a SQLite control plane in a temp dir, and starts
a `Gateway` in this process. Then, for each concurrency `c`, it times `n` GETs:

- direct: the gateway's own aiohttp session straight to the upstream;
- gateway: the same request as a raw ASGI call into the Gateway (check_limits, resolution,
  status gate, admission on Redis, signing, proxying with that same session, usage event,
  last-used, metrics, one JSON access-log line written to /dev/null).

No HTTP server sits in front of the Gateway, so the difference is the gateway's own cost
(including its one Redis round trip), not a client-side HTTP parse. Prints µs per request,
the added µs and the ratio, the admission call's mean time from the gateway's histogram, and
a bare redis-py PING round trip for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import observability  # noqa: E402
from gateway.gateway import Gateway  # noqa: E402
from gateway.redis_link import pack  # noqa: E402
from gateway.upstream import origin  # noqa: E402
from tenancy import keys, plans, tenants  # noqa: E402
from tenancy.controlplane import ControlPlane  # noqa: E402
from tenancy.settings import load_settings  # noqa: E402
from tenancy.store import migrate, open_engine  # noqa: E402

BENCH_PLAN = {
    "bench": {
        "name": "Bench", "trial_days": 0,
        "limits": {"rate_per_second": 1_000_000, "burst": 1_000_000, "concurrency": 100_000,
                   "fail_mode": "closed"},
        "quotas": {"api_calls": 1_000_000_000},
    }
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str) -> None:
    for _ in range(200):
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback only
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


async def run(n: int, concurrencies: list[int], tmp: Path) -> None:
    up_port, redis_port = free_port(), free_port()
    procs = [
        subprocess.Popen(
            [str(ROOT / ".venv/bin/granian"), "--interface", "asgi", "--factory", "--no-ws",
             "--workers", "1", "--port", str(up_port), "benchmarks.upstream:app"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        upstream = f"http://127.0.0.1:{up_port}"
        wait_http(upstream + "/")
        settings = load_settings(
            env={}, data_dir=tmp / "data", database_url=f"sqlite:///{tmp / 'cp.db'}",
            redis_url=f"redis://127.0.0.1:{redis_port}/0", redis_timeout_ms=1000,
            change_channel=f"tollway:changes:{uuid.uuid4().hex[:8]}",
        )
        engine = open_engine(settings.effective_database_url)
        migrate(engine)
        engine.dispose()
        cp = ControlPlane.open(settings)
        plans.apply(cp, {"plans": BENCH_PLAN}, "bench")
        tenant = tenants.create(cp, actor="bench", name="bench", email="b@example.com",
                                plan="bench", upstream=upstream)
        _, secret = keys.create(cp, tenant["id"], actor="bench")

        devnull = open(os.devnull, "wb")  # noqa: SIM115 - closed in finally
        observability.setup_access_log(stream=devnull)
        gateway = Gateway.from_settings(settings, cp.engine)
        await gateway.start()
        try:
            await measure(gateway, upstream, secret, n, concurrencies)
        finally:
            await gateway.close()
            cp.close()
            devnull.close()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(5)


PING = pack(b"PING")


async def measure(gateway: Gateway, upstream: str, secret: str, n: int,
                  concurrencies: list[int]) -> None:
    client = gateway.proxy.client  # the very pool the gateway proxies with
    to = origin(upstream)
    headers = [(b"host", b"api.bench.test"), (b"x-api-key", secret.encode()),
               (b"accept", b"*/*"), (b"user-agent", b"bench")]

    async def direct() -> None:
        resp = await client.request(to, b"GET", b"/v1/items", [])
        await resp.read()
        resp.release()

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses: list[int] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def through() -> None:
        scope = {"type": "http", "method": "GET", "scheme": "http", "path": "/v1/items",
                 "raw_path": b"/v1/items", "query_string": b"", "headers": headers,
                 "client": ("127.0.0.1", 50000), "http_version": "1.1"}
        await gateway(scope, receive, send)

    async def timed(fn: Any, count: int, c: int) -> float:
        per = count // c

        async def worker() -> None:
            for _ in range(per):
                await fn()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        return (time.perf_counter() - started) / (per * c)

    async def ping() -> None:
        await gateway.admission.link.execute(PING)

    await timed(ping, 200, 1)
    print(f"reference: one PING on the admission link {await timed(ping, n, 1) * 1e6:.1f} µs")
    for c in concurrencies:
        await timed(direct, min(n, 500), c)  # warm the pool and both paths
        await timed(through, min(n, 500), c)
        statuses.clear()
        adm = observability.ADMISSION_SECONDS
        before_sum, before_count = _hist(adm)
        t_direct = await timed(direct, n, c)
        t_gw = await timed(through, n, c)
        after_sum, after_count = _hist(adm)
        bad = len([s for s in statuses if s != 200])
        admit_us = (after_sum - before_sum) / max(1, after_count - before_count) * 1e6
        print(f"c={c:<3} direct {t_direct * 1e6:8.1f} µs/req ({1 / t_direct:7.0f} req/s)  "
              f"gateway {t_gw * 1e6:8.1f} µs/req ({1 / t_gw:7.0f} req/s)  "
              f"added {(t_gw - t_direct) * 1e6:7.1f} µs  ratio {t_gw / t_direct:4.2f}x  "
              f"admission call {admit_us:6.1f} µs  non-200 {bad}")


def _hist(histogram: Any) -> tuple[float, float]:
    total = count = 0.0
    for metric in histogram.collect():
        for s in metric.samples:
            if s.name.endswith("_sum"):
                total = s.value
            elif s.name.endswith("_count"):
                count = s.value
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=5000, help="requests per measurement")
    parser.add_argument("-c", type=int, nargs="+", default=[1, 16], help="concurrencies")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args.n, args.c, Path(tmp)))


if __name__ == "__main__":
    main()
