"""CPU per proxied request, in-process: the figure to compare before and after a hot-path change.

    .venv/bin/python benchmarks/bench_hot_path_cpu.py [-n 4000] [-c 16] [-r 5] [--profile N]

Same setup as bench_gateway_overhead.py (a granian upstream, a private redis-server, a
SQLite control plane, the Gateway in this process, the access log written to /dev/null).
Wall time on the shared 2-core box swings with the neighbours' load; this process's own CPU
time does much less, so each round reports `time.process_time()` per request for the bare
aiohttp request ("direct"), for the full gateway path, and for the admission call alone
(`Admission.admit` + `release_later` for the bench tenant, as the gateway makes them), and the
summary takes the median round. The gateway figure includes the client-side halves of its
Redis and upstream calls; "added" is the gateway's CPU on top of the bare proxying request.

`--profile N` runs cProfile over one extra gateway round and prints the N most expensive
functions by own time and by cumulative time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import bench_gateway_overhead as setup

from gateway.admission import month_window
from gateway.gateway import Gateway
from gateway.upstream import origin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=4000, help="requests per round")
    parser.add_argument("-c", type=int, default=16, help="concurrency")
    parser.add_argument("-r", type=int, default=5, help="rounds")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the top N functions of one profiled gateway round")
    args = parser.parse_args()

    async def measure(gateway: Gateway, upstream: str, secret: str, n: int,
                      concurrencies: list[int]) -> None:
        await cpu_rounds(gateway, upstream, secret, n, concurrencies[0], args.r, args.profile)

    setup.measure = measure  # the setup is bench_gateway_overhead's; only the timing differs
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(setup.run(args.n, [args.c], Path(tmp)))


async def cpu_rounds(gateway: Gateway, upstream: str, secret: str, n: int, c: int,
                     rounds: int, profile: int) -> None:
    session = aiohttp.ClientSession()  # the reference: a bare aiohttp request
    lean = gateway.proxy.client
    to = origin(upstream)
    headers = [(b"host", b"api.bench.test"), (b"x-api-key", secret.encode()),
               (b"accept", b"*/*"), (b"user-agent", b"bench")]
    statuses: list[int] = []

    async def direct() -> None:
        async with session.get(upstream + "/v1/items") as resp:
            await resp.read()

    async def lean_direct() -> None:
        resp = await lean.request(to, b"GET", b"/v1/items", [])
        await resp.read()
        resp.release()

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def through() -> None:
        scope = {"type": "http", "method": "GET", "scheme": "http", "path": "/v1/items",
                 "raw_path": b"/v1/items", "query_string": b"", "headers": headers,
                 "client": ("127.0.0.1", 50000), "http_version": "1.1"}
        await gateway(scope, receive, send)

    tenant = next(iter(gateway.refresher.snapshot.tenants.values()))
    key_id = next(iter(gateway.refresher.snapshot.keys.values())).id
    assert tenant.plan is not None
    policy = gateway.policy(tenant.plan)

    async def admission() -> None:
        month, reset_ms = month_window(tenant.tz, int(time.time() * 1000))
        decision = await gateway.admission.admit(tenant.id, key_id, policy, month=month,
                                                 month_reset_ms=reset_ms)
        statuses.append(decision.status)
        gateway.admission.release_later(tenant.id, decision.lease_id)

    async def cpu(fn: Any, count: int) -> float:
        per = count // c

        async def worker() -> None:
            for _ in range(per):
                await fn()

        started = time.process_time()
        await asyncio.gather(*(worker() for _ in range(c)))
        return (time.process_time() - started) / (per * c) * 1e6

    await cpu(direct, 500)
    await cpu(through, 500)
    statuses.clear()
    directs, leans, gateways, admits = [], [], [], []
    for i in range(rounds):
        d, lf = await cpu(direct, n), await cpu(lean_direct, n)
        g, a = await cpu(through, n), await cpu(admission, n)
        directs.append(d)
        leans.append(lf)
        gateways.append(g)
        admits.append(a)
        print(f"round {i + 1}: direct {d:6.1f} µs CPU/req  lean {lf:6.1f}  gateway {g:6.1f}"
              f"  added {g - lf:6.1f}  admission {a:5.1f}")
    await session.close()
    bad = len([s for s in statuses if s != 200])
    d, g, a = statistics.median(directs), statistics.median(gateways), statistics.median(admits)
    lf = statistics.median(leans)
    print(f"median of {rounds} (n={n}, c={c}): direct {d:.1f} µs CPU/req, lean {lf:.1f}, "
          f"gateway {g:.1f}, added {g - lf:.1f}, admission {a:.1f}; non-200 {bad}")
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await cpu(through, n)
        profiler.disable()
        for key in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(profile)
            print(out.getvalue())


if __name__ == "__main__":
    main()
