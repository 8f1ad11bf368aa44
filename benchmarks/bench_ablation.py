"""What each part of the gateway path costs, by stubbing it out in turn.

    .venv/bin/python benchmarks/bench_ablation.py [-n 3000] [-r 3]

Same in-process setup as bench_hot_path_cpu.py (bench_gateway_overhead's granian upstream,
private redis-server, SQLite control plane; 16 concurrent raw ASGI calls). Each variant
replaces one piece with a no-op for one round and puts it back: the access line, metrics, the
usage event, the last-used note, or admission (replaced by a fixed allow). The difference
from "full" is that piece's CPU per request, client halves of its I/O included. Variants are
interleaved round by round so the box's load hits them alike; medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gateway_overhead as setup

from gateway import observability
from gateway.admission import Decision, Policy
from gateway.gateway import Gateway


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3000, help="requests per round")
    parser.add_argument("-r", type=int, default=3, help="rounds")
    args = parser.parse_args()

    async def measure(gateway: Gateway, upstream: str, secret: str, n: int,
                      concurrencies: list[int]) -> None:
        await ablate(gateway, secret, n, concurrencies[0], args.r)

    setup.measure = measure
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(setup.run(args.n, [16], Path(tmp)))


async def ablate(gateway: Gateway, secret: str, n: int, c: int, rounds: int) -> None:
    headers = [(b"host", b"api.bench.test"), (b"x-api-key", secret.encode()),
               (b"accept", b"*/*"), (b"user-agent", b"bench")]

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        return None

    async def through() -> None:
        scope = {"type": "http", "method": "GET", "scheme": "http", "path": "/v1/items",
                 "raw_path": b"/v1/items", "query_string": b"", "headers": headers,
                 "client": ("127.0.0.1", 50000), "http_version": "1.1"}
        await gateway(scope, receive, send)

    async def cpu(count: int) -> float:
        per = count // c

        async def worker() -> None:
            for _ in range(per):
                await through()

        started = time.process_time()
        await asyncio.gather(*(worker() for _ in range(c)))
        return (time.process_time() - started) / (per * c) * 1e6

    async def allow(tenant_id: str, key_id: str, policy: Policy, **_: Any) -> Decision:
        return Decision(True, 200, None, 0, policy, (1,) * len(policy.limits),
                        (1,) * len(policy.limits))

    def nothing(*_: Any, **__: Any) -> None:
        return None

    metrics_type = type(gateway.metrics)
    variants: dict[str, list[tuple[Any, str, Callable[..., Any]]]] = {
        "full": [],
        "no access line": [(observability, "log_access", nothing)],
        "no metrics": [(metrics_type, "request", nothing), (metrics_type, "admission", nothing)],
        "no usage event": [(gateway.emitter, "emit", nothing)],
        "no last-used": [(gateway.last_used, "touch", nothing)],
        "no admission": [(gateway.admission, "admit", allow)],
    }
    await cpu(1000)  # warm the pools and caches
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, patches in variants.items():
            saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
            for obj, attr, stub in patches:
                setattr(obj, attr, stub)
            try:
                results[name].append(await cpu(n))
            finally:
                for obj, attr, original in saved:
                    setattr(obj, attr, original)
    full = statistics.median(results["full"])
    for name, values in results.items():
        value = statistics.median(values)
        saved_us = "" if name == "full" else f"  (saves {full - value:5.1f})"
        print(f"{name:16s} {value:6.1f} µs CPU/req{saved_us}")


if __name__ == "__main__":
    main()
