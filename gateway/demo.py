"""`tollway demo`: the whole product on embedded stores, start to finish, in one command.

A built-in upstream stands in for the operator's API; tenants are seeded on plans tight enough
that the traffic crosses their limits; what was allowed, limited and then metered is read back
through the same surfaces an operator uses (the gateway's answers and the admin usage API), so
the demo shows the real path rather than a simulation of it.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
from aiohttp import web

DEMO_PLAN: dict[str, Any] = {
    "plans": {
        "demo-metered": {
            "name": "Demo (metered)",
            "price": "9.00",
            "currency": "USD",
            "interval": "month",
            "trial_days": 14,
            "limits": {"rate_per_second": 20, "burst": 40, "concurrency": 8,
                       "fail_mode": "closed"},
            "quotas": {"api_calls": 25, "ai_interactions": 10},
        }
    }
}
DEMO_TENANTS = (
    ("Acme Robotics", "ops@acme.example", "starter"),
    ("Globex Analytics", "billing@globex.example", "professional"),
    ("Initech Cloud", "it@initech.example", "demo-metered"),
)
REQUESTS_PER_TENANT = 60
CONCURRENCY = 12
METERING_WAIT_S = 60.0


@dataclass
class Outcome:
    tenant_id: str
    name: str
    plan: str
    answers: Counter[int] = field(default_factory=Counter)
    policies: Counter[str] = field(default_factory=Counter)
    metered: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id, "name": self.name, "plan": self.plan,
            "allowed": self.answers[200], "limited": self.answers[429],
            "other": sum(n for s, n in self.answers.items() if s not in (200, 429)),
            "limited_by": dict(self.policies), "metered": self.metered,
        }


async def _upstream_handler(request: web.Request) -> web.Response:
    """The demo API: AI calls report their token use the way a real upstream would."""
    headers = {}
    if request.path.startswith("/v1/chat"):
        headers["Tollway-Units"] = f"ai_interactions=1, tokens={random.randint(50, 500)}"
    signed = "x-tollway-tenant" in request.headers
    return web.json_response({"path": request.path, "signed_tenant": signed}, headers=headers)


@contextmanager
def upstream() -> Iterator[str]:
    """The built-in upstream on a free loopback port, served from a thread of its own."""
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _upstream_handler)
    runner = web.AppRunner(app, access_log=None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, name="demo-upstream", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def _await_keys(
    base_url: str, secrets: dict[str, str], outcomes: dict[str, Outcome]
) -> None:
    """New keys reach the gateway's snapshot within its check interval; wait for that rather
    than count the first requests as refused. The probe that gets through is a request like
    any other: it is counted, and metered."""
    deadline = time.monotonic() + 10
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for tenant_id, secret in secrets.items():
            while time.monotonic() < deadline:
                async with session.head(base_url + "/ready",
                                        headers={"X-API-Key": secret}) as resp:
                    if resp.status != 401:
                        outcomes[tenant_id].answers[resp.status] += 1
                        break
                await asyncio.sleep(0.1)


async def _drive(base_url: str, secrets: dict[str, str], outcomes: dict[str, Outcome]) -> None:
    """Bursts from every tenant at once: more than the tight plans allow, in rate or quota."""
    paths = ("/v1/items", "/v1/chat/completions", "/v1/items/42")
    work = [(tid, paths[i % len(paths)]) for tid in secrets for i in range(REQUESTS_PER_TENANT)]
    random.shuffle(work)
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            tenant_id, path = queue.get_nowait()
            async with session.get(base_url + path,
                                   headers={"X-API-Key": secrets[tenant_id]}) as resp:
                body = await resp.json(content_type=None)
                outcome = outcomes[tenant_id]
                outcome.answers[resp.status] += 1
                if resp.status == 429:
                    outcome.policies[str(body.get("violated_policy"))] += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(client(session) for _ in range(CONCURRENCY)))


async def _metered(base_url: str, token: str, outcomes: dict[str, Outcome]) -> None:
    """Poll the admin usage report until every allowed request is in ClickHouse."""
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + METERING_WAIT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        pending = dict(outcomes)
        while pending and time.monotonic() < deadline:
            for tenant_id, outcome in list(pending.items()):
                url = f"{base_url}/admin/v1/tenants/{tenant_id}/report"
                async with session.get(url, headers=headers) as resp:
                    if resp.status != 200:  # e.g. 503 while the worker holds ClickHouse
                        continue
                    doc = await resp.json()
                lines = {line["meter"]: str(line["current"]) for line in doc.get("lines", [])}
                outcome.metered = {m: _plain(v) for m, v in lines.items() if float(v)}
                if float(lines.get("api_calls", 0)) >= outcome.answers[200]:
                    del pending[tenant_id]
            if pending:
                await asyncio.sleep(0.5)


def run_traffic(base_url: str, admin_token: str, seeded: list[dict[str, Any]]) -> list[Outcome]:
    """Drive the demo traffic through the running gateway and read back what was metered."""
    outcomes = {row["tenant_id"]: Outcome(row["tenant_id"], row["name"], row["plan"])
                for row in seeded}
    secrets = {row["tenant_id"]: row["secret"] for row in seeded}

    async def main() -> None:
        await _await_keys(base_url, secrets, outcomes)
        await _drive(base_url, secrets, outcomes)
        await _metered(base_url, admin_token, outcomes)

    asyncio.run(main())
    return list(outcomes.values())


def _plain(value: str) -> str:
    """ClickHouse decimals come back with nine places; the demo shows them without."""
    return format(Decimal(value).normalize(), "f")
