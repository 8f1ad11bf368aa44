"""The admission script against a pure-Python model of GCRA, leases and quotas.

Random sequences of clock advances, admits and releases run against the real script on the
test's own redis-server, with the clock supplied by the test; every decision must match the
model's. The script is given a fake clock a day ahead of real time so that its absolute key
expiries never fire during a run. A private server (not the shared numbered databases) keeps
a long run safe from any other test suite's FLUSHDB on this machine.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.admission import Admission, Policy
from gateway.redis_link import RedisLink

# Each example uses fresh tenant ids, so sharing the module's server between them is harmless.
FIXTURE_REUSE = HealthCheck.function_scoped_fixture
MONTH_MS = 20_000  # a fake "month", so that sequences cross quota resets

POLICY = Policy(
    tenant_rate_per_s=4,
    tenant_burst=3,
    key_rate_per_s=3,
    key_burst=2,
    concurrency=3,
    lease_ttl_ms=1_500,
    quotas=(("api_calls", 25, 1), ("tokens", 80, 4)),
)


def month_of(now_ms: int) -> tuple[str, int]:
    return str(now_ms // MONTH_MS), (now_ms // MONTH_MS + 1) * MONTH_MS


@dataclass
class Model:
    """What the script should do, written from the rules in docs/admission.md."""

    policy: Policy
    tats: dict[str, int] = field(default_factory=dict)
    leases: dict[str, dict[str, int]] = field(default_factory=dict)
    used: dict[tuple[str, str, str], int] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)

    def gcra(self, name: str, rate: float, burst: int, now_us: int) -> tuple[int, int, bool]:
        interval = round(1_000_000 / rate)
        tat = max(self.tats.get(name, now_us), now_us)
        return interval, tat, tat + interval - now_us <= interval * burst

    def admit(self, tenant: str, key: str, now_ms: int, lease_id: str) -> tuple[object, ...]:
        p = self.policy
        now = now_ms * 1000
        month, reset_ms = month_of(now_ms)
        t_int, t_tat, t_ok = self.gcra(tenant, p.tenant_rate_per_s, p.tenant_burst, now)
        k_int, k_tat, k_ok = self.gcra(tenant + "/" + key, p.key_rate_per_s, p.key_burst, now)
        held = {i: e for i, e in self.leases.get(tenant, {}).items() if e > now_ms}
        self.leases[tenant] = held
        used = [self.used.get((tenant, m, month), 0) for m, _, _ in p.quotas]

        # Every failing check, in the order the script reports the first of them.
        failing: list[tuple[str, int]] = []
        if not t_ok:
            failing.append(("tenant-rate", t_tat + t_int - now - t_int * p.tenant_burst))
        if not k_ok:
            failing.append(("key-rate", k_tat + k_int - now - k_int * p.key_burst))
        if len(held) >= p.concurrency:
            failing.append(("concurrency", (min(held.values()) - now_ms) * 1000))
        for (meter, limit, inc), u in zip(p.quotas, used, strict=True):
            if u + inc > limit:
                failing.append((f"quota:{meter}", (reset_ms - now_ms) * 1000))
        self.failing = {name for name, _ in failing}
        violated, retry_us = failing[0] if failing else (None, 0)
        if violated is None:
            t_tat, k_tat = t_tat + t_int, k_tat + k_int
            self.tats[tenant], self.tats[tenant + "/" + key] = t_tat, k_tat
            held[lease_id] = now_ms + p.lease_ttl_ms
            for i, (meter, _, inc) in enumerate(p.quotas):
                used[i] += inc
                self.used[(tenant, meter, month)] = used[i]
        remaining = (
            (t_int * p.tenant_burst - (t_tat - now)) // t_int,
            (k_int * p.key_burst - (k_tat - now)) // k_int,
            p.concurrency - len(held),
            *(limit - u for (_, limit, _), u in zip(p.quotas, used, strict=True)),
        )
        retry_s = 0 if violated is None else max(1, -(-retry_us // 1_000_000))
        return violated is None, violated, retry_s, remaining

    def release(self, tenant: str, lease_id: str) -> None:
        self.leases.get(tenant, {}).pop(lease_id, None)


steps = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.integers(1, 600)),
        st.tuples(st.just("admit"), st.integers(0, 1), st.sampled_from(["k1", "k2"])),
        st.tuples(st.just("release"), st.integers(0, 50)),
    ),
    min_size=1,
    max_size=60,
)


async def run(redis_url: str, ops: list[tuple[object, ...]], cache: int) -> None:
    link = RedisLink.from_url(redis_url)
    admission = Admission(link, timeout_ms=2_000, deny_cache_size=cache)
    model = Model(POLICY)
    run_id = uuid.uuid4().hex[:8]
    tenants = [f"{run_id}a", f"{run_id}b"]
    held: list[tuple[str, str]] = []
    now = int(time.time() * 1000) + 86_400_000
    try:
        for op in ops:
            if op[0] == "advance":
                now += int(op[1])  # type: ignore[call-overload]
            elif op[0] == "admit":
                tenant = tenants[int(op[1])]  # type: ignore[call-overload]
                month, reset = month_of(now)
                got = await admission.admit(
                    tenant, str(op[2]), POLICY, month=month, month_reset_ms=reset, now_ms=now
                )
                want = model.admit(tenant, str(op[2]), now, got.lease_id or "")
                if cache:
                    # A cached refusal replays an earlier one: it must still be a refusal, and
                    # the policy it names must still be violated (though maybe not first).
                    assert got.allowed == want[0], (op, got, want)
                    assert got.violated is None or got.violated in model.failing, (op, got, want)
                else:
                    assert (got.allowed, got.violated, got.retry_after_s, got.remaining) == want, (
                        op, got, want,
                    )
                if got.lease_id:
                    held.append((tenant, got.lease_id))
            elif held:
                tenant, lease = held.pop(int(op[1]) % len(held))  # type: ignore[call-overload]
                await admission.release(tenant, lease)
                model.release(tenant, lease)
    finally:
        await admission.close()


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    probe = redis.Redis(port=port, socket_connect_timeout=0.2)
    for _ in range(100):
        try:
            probe.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    probe.close()
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(5)


@settings(max_examples=40, deadline=None, suppress_health_check=[FIXTURE_REUSE])
@given(ops=steps)
def test_script_matches_model(server_url: str, ops: list[tuple[object, ...]]) -> None:
    asyncio.run(run(server_url, ops, cache=0))


@settings(max_examples=25, deadline=None, suppress_health_check=[FIXTURE_REUSE])
@given(ops=steps)
def test_deny_cache_never_changes_a_verdict(
    server_url: str, ops: list[tuple[object, ...]]
) -> None:
    asyncio.run(run(server_url, ops, cache=64))


def test_model_sees_bursts_and_quota() -> None:
    """The model itself: a fresh tenant gets its burst, then is paced; quotas stop it."""
    model = Model(POLICY)
    now = 50 * MONTH_MS
    verdicts = []
    for i in range(4):
        verdicts.append(model.admit("t", f"k{i}", now, f"l{i}")[1])
        model.release("t", f"l{i}")
    assert verdicts == [None, None, None, "tenant-rate"]
    for i in range(17):
        now += 1_000
        assert model.admit("t", "k9", now, f"m{i}")[1] is None
        model.release("t", f"m{i}")
    assert model.admit("t", "k9", now + 1_000, "m99")[1] == "quota:tokens"
    assert model.admit("t", "k9", (51 * MONTH_MS), "m99")[1] is None
