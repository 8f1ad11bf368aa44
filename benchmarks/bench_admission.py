"""Admission cost against a plain Redis round trip, measured in the same run.

Three calls on the same pipelined connection (gateway.redis_link): PING (the floor), a raw
EVALSHA of the admission script with precomputed arguments (the script's own cost), and
`Admission.admit` (script plus the Python around it). Latency is measured one call at a
time; throughput with `--concurrency` calls in flight. Also reports retained memory growth
over 1000 admits (the key and refusal caches are bounded, so it should stay near zero).

    .venv/bin/python benchmarks/bench_admission.py [--url redis://127.0.0.1:6379/0] [--n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable

from gateway.admission import QUOTA_GRACE_MS, SCRIPT, SCRIPT_SHA, Admission, Policy
from gateway.redis_link import RedisLink, pack

POLICY = Policy(
    tenant_rate_per_s=1e6, tenant_burst=1_000_000, key_rate_per_s=1e6, key_burst=1_000_000,
    concurrency=100_000, lease_ttl_ms=10_000,
    quotas=(("api_calls", 10**12, 1), ("ai_interactions", 10**12, 0)),
)
TENANTS = 100


def pct(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


async def latency(call: Callable[[int], Awaitable[object]], n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await call(i)
        out.append((time.perf_counter() - t0) * 1e6)
    out.sort()
    return out


async def throughput(call: Callable[[int], Awaitable[object]], n: int, concurrency: int) -> float:
    async def worker(w: int) -> None:
        for i in range(w, n, concurrency):
            await call(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return n / (time.perf_counter() - t0)


async def main(url: str, n: int, concurrency: int) -> None:
    link = RedisLink.from_url(url)
    admission = Admission(link, timeout_ms=1_000)
    run = uuid.uuid4().hex[:6]
    tenants = [f"bench-{run}-{i}" for i in range(TENANTS)]
    reset = int(time.time() * 1000) + 60_000  # quota counters lapse an hour after this
    await link.execute(pack(b"SCRIPT", b"LOAD", SCRIPT.encode()))
    ping_command = pack(b"PING")

    async def ping(i: int) -> object:
        return await link.execute(ping_command)

    raw_calls = [
        pack(
            b"EVALSHA", SCRIPT_SHA.encode(), b"5",
            *(k.encode() for k in (
                f"{{t:{t}}}:rate", f"{{t:{t}}}:rate:k:k", f"{{t:{t}}}:leases",
                f"{{t:{t}}}:quota:api_calls:m", f"{{t:{t}}}:quota:ai_interactions:m")),
            b"", *POLICY.script_args, b"", str(reset).encode(),
            str(reset + QUOTA_GRACE_MS).encode(), *POLICY.quota_args,
        )
        for t in tenants
    ]

    async def evalsha(i: int) -> object:
        return await link.execute(raw_calls[i % TENANTS])

    async def admit(i: int) -> object:
        tenant = tenants[i % TENANTS]
        d = await admission.admit(tenant, "k", POLICY, month="m", month_reset_ms=reset)
        await admission.release(tenant, d.lease_id)  # keep the lease sets small
        return d

    async def admit_only(i: int) -> object:
        tenant = tenants[i % TENANTS]
        return await admission.admit(tenant, "k", POLICY, month="m", month_reset_ms=reset)

    for call in (ping, evalsha, admit):  # warm up connections and caches
        await latency(call, 200)

    print(f"n={n} sequential, then {concurrency} in flight; latency in microseconds")
    print(f"{'call':<10}{'p50':>8}{'p99':>8}{'ops/s':>10}{'p50/ping':>10}{'p99/ping':>10}")
    base: list[float] = []
    for name, call in (("ping", ping), ("evalsha", evalsha), ("admit", admit_only)):
        lat = await latency(call, n)
        ops = await throughput(call, n, concurrency)
        base = base or lat
        print(
            f"{name:<10}{pct(lat, 0.5):>8.0f}{pct(lat, 0.99):>8.0f}{ops:>10.0f}"
            f"{pct(lat, 0.5) / pct(base, 0.5):>10.2f}{pct(lat, 0.99) / pct(base, 0.99):>10.2f}"
        )
    print(f"admit mean {statistics.fmean(lat):.0f} us")

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(1000):
        await admit_only(i)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if s.size_diff > 0)
    print(f"retained allocation growth over 1000 admits: {grown} bytes")
    await admission.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.n, args.concurrency))
