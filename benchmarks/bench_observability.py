"""CPU per call of the gateway's per-request observability: the access line and the metrics.

    .venv/bin/python benchmarks/bench_observability.py [-n 200000] [-r 5] [-c 16]

Runs in an event loop the way the gateway does: `c` requests' worth of calls per loop turn,
then a yield, so the access log's once-per-turn flush happens as often as it would at that
concurrency. Each round reports `time.process_time()` per call of

- `log_access` with the default sink (JSON lines to a buffered binary stream, /dev/null here),
- `log_access` with a handler the process configured itself (a StreamHandler on /dev/null
  with JsonFormatter, as bench_gateway_overhead.py sets up), which takes the logging path,
- `log_access` with the access logger turned off (level WARNING),
- `RequestMetrics.request` and `RequestMetrics.admission` (lock-free series, cached per
  label combination),

and the summary takes the median round.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import observability
from gateway.admission import Decision, Policy


def access_doc(i: int) -> dict[str, object]:
    """A line the size of the gateway's proxied-request line."""
    return {
        "request_id": f"{i:016x}", "tenant_id": "t_0123456789abcdef", "method": "GET",
        "route": "/v1/*", "status": 200, "latency_ms": 1.234, "upstream_ms": 0.987,
        "bytes_in": 0, "bytes_out": 1234, "aborted": False,
    }


async def per_call(fn: Callable[[int], None], n: int, c: int) -> float:
    """µs of process CPU per call, yielding to the loop every `c` calls."""
    started = time.process_time()
    for turn in range(n // c):
        base = turn * c
        for i in range(base, base + c):
            fn(i)
        await asyncio.sleep(0)
    return (time.process_time() - started) / (n // c * c) * 1e6


async def rounds(n: int, r: int, c: int) -> None:
    metrics = observability.RequestMetrics()
    allowed = Decision(True, 200, None, 0, Policy.__new__(Policy))
    devnull_text = open(os.devnull, "w")  # noqa: SIM115 - closed below
    handler = logging.StreamHandler(devnull_text)
    handler.setFormatter(observability.JsonFormatter())
    log = observability.access_log

    def log_line(i: int) -> None:
        observability.log_access(access_doc(i))

    def doc_only(i: int) -> None:
        access_doc(i)  # subtracted: the gateway builds the dict either way

    def request(i: int) -> None:
        metrics.request(200, "t_0123456789abcdef", 0.0012, 0.0009)

    def admission(i: int) -> None:
        metrics.admission(allowed, 0.0003)

    with open(os.devnull, "wb") as devnull:
        observability.setup_access_log(stream=devnull)
        results: dict[str, list[float]] = {}
        for i in range(r + 1):  # the first round warms up and is dropped
            log.setLevel(logging.INFO)
            doc = await per_call(doc_only, n, c)
            timings = {"sink": await per_call(log_line, n, c) - doc}
            log.addHandler(handler)
            timings["handler"] = await per_call(log_line, n, c) - doc
            log.removeHandler(handler)
            log.setLevel(logging.WARNING)
            timings["off"] = await per_call(log_line, n, c) - doc
            timings["request"] = await per_call(request, n, c)
            timings["admission"] = await per_call(admission, n, c)
            if i == 0:
                continue
            print(f"round {i}: " + "  ".join(f"{k} {v:5.2f}" for k, v in timings.items()))
            for k, v in timings.items():
                results.setdefault(k, []).append(v)
        observability.flush_access_log()
    devnull_text.close()
    print(f"median of {r} (n={n}, c={c}), µs CPU/call: "
          + ", ".join(f"log_access {k} {statistics.median(results[k]):.2f}"
                      for k in ("sink", "handler", "off"))
          + f", metrics.request {statistics.median(results['request']):.2f}"
          + f", metrics.admission {statistics.median(results['admission']):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200_000, help="calls per measurement")
    parser.add_argument("-r", type=int, default=5, help="rounds")
    parser.add_argument("-c", type=int, default=16, help="calls per event-loop turn")
    args = parser.parse_args()
    asyncio.run(rounds(args.n, args.r, args.c))


if __name__ == "__main__":
    main()
