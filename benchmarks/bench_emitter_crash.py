"""The emitter's crash loss window, measured: SIGKILL a process that emits at a fixed rate.

The child emits `--rate` events/s through a UsageEmitter (usage_flush_ms as configured) and
after every tick records how many it has emitted in a file (page cache survives SIGKILL).
The parent kills it at a random moment, then compares that count with the entries that
reached the streams. The expected bound is rate × flush interval plus the batch in flight.

    .venv/bin/python benchmarks/bench_emitter_crash.py --rate 5000 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis

from gateway.spool import Spool
from gateway.usage_emitter import UsageEmitter
from metering.events import UsageEvent, stream_key

SHARDS = 4


async def child(url: str, rate: int, flush_ms: int, count_file: Path, spool_dir: Path) -> None:
    emitter = UsageEmitter(
        aioredis.Redis.from_url(url),
        Spool.open(spool_dir, 1 << 26),
        shards=SHARDS,
        flush_ms=flush_ms,
        batch=5000,
    )
    emitter.start()
    fd = os.open(count_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    tick = 0.005
    per_tick = max(1, int(rate * tick))
    emitted = 0
    started = time.perf_counter()
    while True:
        now_ms = int(time.time() * 1000)
        for _ in range(per_tick):
            emitter.emit(
                UsageEvent(tenant_id=f"t{emitted % 50}", meter="m", subject="s", time_ms=now_ms)
            )
            emitted += 1
        os.pwrite(fd, f"{emitted:>12}".encode(), 0)
        await asyncio.sleep(max(0.0, started + emitted / rate - time.perf_counter()))


def run_once(url: str, rate: int, flush_ms: int) -> tuple[int, int]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        count_file = Path(tmp) / "emitted"
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", url, str(rate), str(flush_ms), tmp],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        time.sleep(2.0 + random.random())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        emitted = int(count_file.read_text() or 0)
    reached = sum(int(client.xlen(stream_key(shard))) for shard in range(SHARDS))
    client.flushdb()
    return emitted, reached


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        url, rate, flush_ms, tmp = (
            sys.argv[2],
            int(sys.argv[3]),
            int(sys.argv[4]),
            Path(sys.argv[5]),
        )
        asyncio.run(child(url, rate, flush_ms, tmp / "emitted", tmp / "spool"))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--flush-ms", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    bound = args.rate * args.flush_ms / 1000
    for _ in range(args.runs):
        emitted, reached = run_once(args.redis, args.rate, args.flush_ms)
        lost = emitted - reached
        print(
            f"rate {args.rate}/s flush {args.flush_ms} ms: emitted {emitted}, "
            f"in streams {reached}, "
            f"lost {lost} ({1000 * lost / args.rate:.0f} ms of traffic; one interval = {bound:.0f})"
        )


if __name__ == "__main__":
    main()
