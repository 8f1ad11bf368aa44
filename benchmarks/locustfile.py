"""A multi-tenant traffic mix for load testing a running gateway.

    .venv/bin/python benchmarks/gateway_target.py serve --port 8080 &   # prints the keys file
    TOLLWAY_KEYS_FILE=/tmp/tollway-gateway-.../gateway/keys.json \\
        .venv/bin/locust -f benchmarks/locustfile.py --headless -u 50 -r 10 -t 30s \\
        --host http://127.0.0.1:8080

The keys file is the one benchmarks/gateway_target.py writes (`{"header": ..., "tenants":
[{"tenant_id", "plan", "key"}]}`); any gateway's keys in that shape will do. Each request
picks its tenant by a Zipf-like law (weight 1/rank^s, s = LOCUST_ZIPF_S, 1.1 by default), so a
few tenants send most of the traffic, as on a real SaaS. The tenants on the tight plan sit at
ranks 2, 4, 8... among them: the hot ones go over their limits and get 429s, the cold ones
do not. A 429 with a Retry-After is the gateway doing its job, so it counts as a success;
the per-plan status counts printed at the end show how many there were. 80% of requests are
GETs with a varying query, 20% POST a small JSON body.

Each simulated client sends at most LOCUST_USER_RPS requests/s (constant throughput, 10 by
default), so `-u 50` offers up to 500 requests/s.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from locust import FastHttpUser, constant_throughput, events, task

TIGHT_PLAN = "bench-tight"
POST_BODY = json.dumps({"name": "widget", "size": 3, "tags": ["a", "b"], "note": "x" * 120})
statuses: defaultdict[str, Counter[int]] = defaultdict(Counter)


def _keys_file() -> Path:
    path = os.environ.get("TOLLWAY_KEYS_FILE")
    if not path:
        raise SystemExit("set TOLLWAY_KEYS_FILE to the keys.json benchmarks/gateway_target.py "
                         "wrote (it prints the path)")
    return Path(path)


def _ranked(tenants: list[dict[str, str]]) -> list[dict[str, str]]:
    """Unthrottled tenants in file order, with the tight ones slotted in at ranks 2, 4, 8..."""
    regular = [t for t in tenants if t["plan"] != TIGHT_PLAN]
    tight = [t for t in tenants if t["plan"] == TIGHT_PLAN]
    for n, tenant in enumerate(tight):
        regular.insert(min(len(regular), 2 ** (n + 1) - 1), tenant)
    return regular


_doc = json.loads(_keys_file().read_text())
HEADER: str = _doc["header"]
TENANTS = _ranked(_doc["tenants"])
_S = float(os.environ.get("LOCUST_ZIPF_S", "1.1"))
CUMULATIVE = list(itertools.accumulate(1 / rank**_S for rank in range(1, len(TENANTS) + 1)))


def pick() -> dict[str, str]:
    return TENANTS[bisect.bisect(CUMULATIVE, random.random() * CUMULATIVE[-1])]


class TenantClient(FastHttpUser):
    wait_time = constant_throughput(float(os.environ.get("LOCUST_USER_RPS", "10")))

    def _call(self, method: str, path: str, name: str, body: str | None = None) -> None:
        tenant = pick()
        headers = {HEADER: tenant["key"]}
        if body is not None:
            headers["Content-Type"] = "application/json"
        with self.client.request(method, path, name=name, data=body, headers=headers,
                                 catch_response=True) as response:
            status = response.status_code
            statuses[tenant["plan"]][status] += 1
            if status == 200:
                response.success()
            elif status == 429 and response.headers.get("Retry-After"):
                response.success()  # over the plan's limits: the expected outcome
            else:
                response.failure(f"status {status}")

    @task(8)
    def list_items(self) -> None:
        self._call("GET", f"/v1/items?page={random.randint(1, 20)}", "GET /v1/items")

    @task(2)
    def create_item(self) -> None:
        self._call("POST", "/v1/items", "POST /v1/items", POST_BODY)


@events.test_stop.add_listener  # type: ignore[untyped-decorator]  # locust ships no types here
def _report(environment: Any, **_kw: Any) -> None:
    for plan, counts in sorted(statuses.items()):
        line = " ".join(f"{status}={n}" for status, n in sorted(counts.items()))
        print(f"statuses for plan {plan}: {line}")
