"""Admission: one Redis round trip decides whether a request may be proxied.

`admission.lua` checks and consumes the tenant rate, the key rate, a concurrency lease and
the monthly quotas atomically; this module turns a plan's limits into the script's arguments
once per snapshot (`Policy`), runs the script under a hard timeout behind a circuit breaker,
and applies the plan's failure mode when Redis cannot answer. See docs/admission.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from prometheus_client import Counter

from gateway import ratelimit_headers
from gateway.breaker import Breaker
from gateway.local_limiter import LocalLimiter
from gateway.redis_link import RedisLink, ReplyError, pack
from tenancy.hotstate import redis_url
from tenancy.plans import Plan
from tenancy.settings import Settings

log = logging.getLogger(__name__)

SCRIPT = Path(__file__).with_name("admission.lua").read_text()
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1

QUOTA_GRACE_MS = 3_600_000  # quota counters outlive the month reset by an hour of clock skew
MONTH_WINDOW_S = 2_592_000  # nominal window advertised for monthly quotas; `t` is exact
DENY_CACHE_MAX_MS = 60_000  # a cached refusal is re-checked at least this often

FAIL_OPEN = "open"
FAIL_CLOSED = "closed"

DEGRADED = Counter(
    "tollway_admission_degraded_total",
    "Requests decided without Redis, by outcome (admitted, limited, refused)",
    ["outcome"],
)
REDIS_FAILURES = Counter(
    "tollway_admission_redis_failures_total", "Admission calls to Redis that failed or timed out"
)
DENY_CACHE_HITS = Counter(
    "tollway_admission_deny_cache_hits_total", "Refusals answered from the local cache"
)
_DEGRADED_ADMITTED = DEGRADED.labels("admitted")
_DEGRADED_LIMITED = DEGRADED.labels("limited")
_DEGRADED_REFUSED = DEGRADED.labels("refused")

_FAILURES = (ReplyError, OSError, TimeoutError)  # ConnectionError is an OSError

# A script call packed in RESP, but for the command and the two arguments that change per
# request (now and the lease id): (array header, key count and keys, before the lease, after it)
_Call = tuple[bytes, bytes, bytes, bytes]


@dataclass(frozen=True, slots=True)
class Limit:
    """One advertised policy: its name in headers and refusals, quota and window."""

    name: str
    quota: int
    window_s: int | None


@dataclass(frozen=True, slots=True, eq=False)
class Policy:
    """A plan's admission limits, with everything the hot path derives from them precomputed.

    A rate or concurrency of 0 means that limit is not applied; quotas are
    (meter, monthly limit, units charged per request). A meter charged 0 per request is only
    checked: its counter (`quota_key`) is incremented by whoever records that usage.
    """

    tenant_rate_per_s: float
    tenant_burst: int
    key_rate_per_s: float = 0.0
    key_burst: int = 0
    concurrency: int = 0
    lease_ttl_ms: int = 60_000
    quotas: tuple[tuple[str, int, int], ...] = ()
    fail_mode: str = FAIL_CLOSED
    local_rate_per_s: float = 0.0
    limits: tuple[Limit, ...] = field(init=False)
    policy_field: bytes = field(init=False)
    script_args: tuple[bytes, ...] = field(init=False)
    quota_args: tuple[bytes, ...] = field(init=False)
    violations: tuple[str, ...] = field(init=False)
    slots: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.fail_mode not in (FAIL_OPEN, FAIL_CLOSED):
            raise ValueError(f"fail_mode must be {FAIL_OPEN!r} or {FAIL_CLOSED!r}")
        for name in ("tenant_rate_per_s", "key_rate_per_s", "local_rate_per_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("tenant_burst", "key_burst", "concurrency", "lease_ttl_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.tenant_rate_per_s and self.tenant_burst < 1:
            raise ValueError("tenant_burst must be at least 1")
        if self.key_rate_per_s and self.key_burst < 1:
            raise ValueError("key_burst must be at least 1")
        if self.concurrency and self.lease_ttl_ms < 1:
            raise ValueError("lease_ttl_ms must be positive")
        for meter, limit, inc in self.quotas:
            if not meter or limit < 0 or inc < 0:
                raise ValueError(f"bad quota {(meter, limit, inc)!r}")

        limits: list[Limit] = []
        slots: list[int] = []  # reply index of each advertised policy's remaining count
        if self.tenant_rate_per_s:
            window = _window(self.tenant_burst, self.tenant_rate_per_s)
            limits.append(Limit("tenant-rate", self.tenant_burst, window))
            slots.append(4)
        if self.key_rate_per_s:
            window = _window(self.key_burst, self.key_rate_per_s)
            limits.append(Limit("key-rate", self.key_burst, window))
            slots.append(6)
        if self.concurrency:
            limits.append(Limit("concurrency", self.concurrency, None))
            slots.append(8)
        for i, (meter, limit, _) in enumerate(self.quotas):
            limits.append(Limit(f"quota:{meter}", limit, MONTH_WINDOW_S))
            slots.append(9 + i)
        set_ = object.__setattr__
        set_(self, "limits", tuple(limits))
        set_(self, "slots", tuple(slots))
        set_(self, "policy_field", ratelimit_headers.policy_field(self.limits))
        # Script arguments as bytes: redis-py passes bytes through, where an int costs it a
        # repr and an encode on every request.
        set_(self, "script_args", _encoded(
            _interval_us(self.tenant_rate_per_s), self.tenant_burst,
            _interval_us(self.key_rate_per_s), self.key_burst,
            self.concurrency, self.lease_ttl_ms,
        ))
        set_(self, "quota_args", _encoded(
            *(n for _, limit, inc in self.quotas for n in (limit, inc))))
        set_(self, "violations", (
            "", "tenant-rate", "key-rate", "concurrency",
            *(f"quota:{meter}" for meter, _, _ in self.quotas),
        ))


    @classmethod
    def from_plan(
        cls,
        plan: Plan,
        *,
        key_rate_per_s: float = 0.0,
        key_burst: int = 0,
        lease_ttl_ms: int = 60_000,
        request_meter: str = "api_calls",
    ) -> Policy:
        """The policy of a plan: its limits apply per tenant, each request charges one unit of
        `request_meter`, and its other monthly quotas are checked."""
        return cls(
            tenant_rate_per_s=plan.rate_per_second,
            tenant_burst=plan.burst,
            key_rate_per_s=key_rate_per_s,
            key_burst=key_burst,
            concurrency=plan.concurrency,
            lease_ttl_ms=lease_ttl_ms,
            quotas=tuple(
                (meter, limit, 1 if meter == request_meter else 0)
                for meter, limit in sorted(plan.quotas.items())
            ),
            fail_mode=plan.fail_mode,
            local_rate_per_s=plan.local_rate_per_second or 0.0,
        )


def quota_key(tenant_id: str, meter: str, month: str) -> str:
    """The Redis counter of a tenant's monthly usage of a meter, in the tenant's hash slot."""
    return f"{{t:{tenant_id}}}:quota:{meter}:{month}"


def _interval_us(rate_per_s: float) -> int:
    return max(1, round(1_000_000 / rate_per_s)) if rate_per_s else 0


def _window(burst: int, rate_per_s: float) -> int:
    return max(1, math.ceil(burst / rate_per_s))


def _encoded(*values: int | str) -> tuple[bytes, ...]:
    return tuple(str(v).encode() for v in values)


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


_EVALSHA = _bulk(b"EVALSHA") + _bulk(SCRIPT_SHA.encode())
_EVAL = _bulk(b"EVAL") + _bulk(SCRIPT.encode())


def _packed(args: tuple[bytes, ...]) -> bytes:
    return b"".join(map(_bulk, args))


@dataclass(slots=True)
class Decision:
    """The outcome of admission. `remaining` and `reset_s` align with `policy.limits`; they are
    empty when Redis was not consulted. `degraded` marks decisions made without Redis.
    Not frozen, though never changed: a frozen dataclass costs a setattr call per field to
    build, once per request (the deny cache hands out copies)."""

    allowed: bool
    status: int
    violated: str | None
    retry_after_s: int
    policy: Policy
    remaining: tuple[int, ...] = ()
    reset_s: tuple[int | None, ...] = ()
    lease_id: str | None = None
    degraded: bool = False

    @property
    def violated_index(self) -> int:
        """Index of the violated policy in `policy.limits`, or -1."""
        for i, limit in enumerate(self.policy.limits):
            if limit.name == self.violated:
                return i
        return -1


_months: dict[ZoneInfo, tuple[int, int, str]] = {}


def month_window(zone: ZoneInfo, now_ms: int) -> tuple[str, int]:
    """The quota month containing `now_ms` in `zone`, and the epoch ms at which it ends.

    Called per request, so the current month of each zone is remembered until it ends.
    """
    known = _months.get(zone)
    if known is not None and known[0] <= now_ms < known[1]:
        return known[2], known[1]
    local = datetime.fromtimestamp(now_ms / 1000, zone)
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    start = int(datetime(local.year, local.month, 1, tzinfo=zone).timestamp() * 1000)
    reset = int(datetime(year, month, 1, tzinfo=zone).timestamp() * 1000)
    name = f"{local.year:04d}-{local.month:02d}"
    if len(_months) >= 1024:  # there are ~600 zones; this only guards against odd ZoneInfo use
        _months.clear()
    _months[zone] = (start, reset, name)
    return name, reset


class Admission:
    """Runs admission for one gateway process; share one instance across requests."""

    def __init__(
        self,
        link: RedisLink,
        *,
        timeout_ms: int = 50,
        breaker: Breaker | None = None,
        local: LocalLimiter | None = None,
        deny_cache_size: int = 4096,
    ) -> None:
        self.link = link
        self.timeout_s = timeout_ms / 1000
        self.breaker = breaker or Breaker(5, 2.0)
        self.local = local or LocalLimiter()
        self.deny_cache_size = deny_cache_size
        self._denied: dict[tuple[str, str], tuple[float, Decision]] = {}
        self._calls: dict[tuple[str, str, str, int, Policy], _Call] = {}
        self._lease_ids = itertools.count()
        self._node = os.urandom(6).hex()
        self._releases: list[tuple[str, str]] = []
        self._releasing: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Admission:
        # Every call is bounded by its own `asyncio.timeout`; the link never retries (a
        # retried EVALSHA could charge twice), the breaker handles outages.
        link = RedisLink.from_url(
            redis_url(settings), connect_timeout_s=settings.redis_timeout_ms / 1000)
        return cls(
            link,
            timeout_ms=settings.redis_timeout_ms,
            breaker=Breaker(settings.breaker_failures, settings.breaker_reset_s),
        )

    async def admit(
        self,
        tenant_id: str,
        key_id: str,
        policy: Policy,
        *,
        month: str,
        month_reset_ms: int,
        now_ms: int | None = None,
    ) -> Decision:
        """Decide one request. `now_ms` replaces both the Redis clock and the local clock, for
        deterministic tests; in production leave it None so every node uses the server's TIME."""
        local_now = time.monotonic() * 1000 if now_ms is None else now_ms
        if self._denied:
            cached = self._denied.get((tenant_id, key_id))
            if cached is not None:
                until, decision = cached
                if until > local_now and decision.policy is policy:
                    DENY_CACHE_HITS.inc()
                    retry_s = max(1, math.ceil((until - local_now) / 1000))
                    return replace(decision, retry_after_s=retry_s)
                del self._denied[(tenant_id, key_id)]
        if not self.breaker.allow():
            return self._degraded(tenant_id, policy)

        call = self._calls.get((tenant_id, key_id, month, month_reset_ms, policy))
        if call is None:
            call = self._call_for(tenant_id, key_id, month, month_reset_ms, policy)
        lease_id = f"{self._node}:{next(self._lease_ids)}" if policy.concurrency else ""
        try:
            reply = await self._run(
                call, b"" if now_ms is None else str(now_ms).encode(), lease_id.encode())
        except _FAILURES:
            REDIS_FAILURES.inc()
            self.breaker.failure()
            return self._degraded(tenant_id, policy)
        self.breaker.success()
        return self._decide(reply, tenant_id, key_id, policy, lease_id, month_reset_ms, local_now)

    async def release(self, tenant_id: str, lease_id: str | None) -> None:
        """Return a concurrency lease. Failure is tolerated: an unreturned lease lapses by TTL."""
        if not lease_id:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.link.execute(
                    pack(b"ZREM", f"{{t:{tenant_id}}}:leases".encode(), lease_id.encode()))
        except _FAILURES:
            REDIS_FAILURES.inc()

    def release_later(self, tenant_id: str, lease_id: str | None) -> None:
        """Release without waiting, for use after the response has been sent. Releases are
        batched: whatever accumulates while one pipeline is in flight goes in the next, so
        under load a release costs a share of one round trip instead of one of its own."""
        if not lease_id:
            return
        self._releases.append((f"{{t:{tenant_id}}}:leases", lease_id))
        if self._releasing is None:
            self._releasing = asyncio.get_running_loop().create_task(self._release_batches())

    async def _release_batches(self) -> None:
        try:
            while self._releases:
                batch, self._releases = self._releases, []
                by_key: dict[str, list[str]] = {}
                for key, lease_id in batch:  # one ZREM per lease set, not per lease
                    by_key.setdefault(key, []).append(lease_id)
                try:
                    async with asyncio.timeout(self.timeout_s * 2):
                        await self.link.execute_many([
                            pack(b"ZREM", key.encode(), *(i.encode() for i in lease_ids))
                            for key, lease_ids in by_key.items()
                        ])
                except _FAILURES:  # unreturned leases lapse by TTL
                    REDIS_FAILURES.inc()
        finally:
            self._releasing = None

    async def charge(
        self, tenant_id: str, charges: list[tuple[str, int]], month: str, reset_ms: int
    ) -> None:
        """Add recorded units (e.g. upstream-reported `ai_interactions`) to the monthly
        counters that admission only checks. Failure is logged and tolerated: the usage events
        still carry the units, only the quota check lags."""
        expire_at = str(reset_ms + QUOTA_GRACE_MS).encode()
        commands = []
        for meter, amount in charges:
            key = quota_key(tenant_id, meter, month).encode()
            commands.append(pack(b"INCRBY", key, str(amount).encode()))
            commands.append(pack(b"PEXPIREAT", key, expire_at))
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                await self.link.execute_many(commands)
        except _FAILURES as exc:
            REDIS_FAILURES.inc()
            log.warning("could not add reported units to %s's quota counters: %r", tenant_id, exc)

    async def close(self) -> None:
        if self._releasing is not None:
            await asyncio.gather(self._releasing, return_exceptions=True)
        await self.link.aclose()

    async def _run(self, call: _Call, now: bytes, lease_id: bytes) -> list[int]:
        """EVALSHA, packed here: only `now` and the lease id change per request. A call cut
        off by its timeout leaves the shared link usable; its reply is dropped on arrival."""
        header, keys, middle, tail = call
        varying = (_bulk(now), middle, _bulk(lease_id), tail)
        try:
            reply: list[int] = await self.link.execute(
                b"".join((header, _EVALSHA, keys, *varying)), self.timeout_s)
        except ReplyError as exc:
            if not exc.noscript:
                raise
            # The script cache was flushed or Redis restarted; EVAL loads it again.
            reply = await self.link.execute(b"".join((header, _EVAL, keys, *varying)),
                                            self.timeout_s)
        return reply

    def _call_for(
        self, tenant_id: str, key_id: str, month: str, month_reset_ms: int, policy: Policy
    ) -> _Call:
        """The script call's parts that stay the same for a tenant, key, month and policy
        (argument layout: admission.lua), packed once."""
        tag = f"{{t:{tenant_id}}}"
        keys = [f"{tag}:rate", f"{tag}:rate:k:{key_id}", f"{tag}:leases"]
        keys.extend(quota_key(tenant_id, meter, month) for meter, _, _ in policy.quotas)
        tail = _encoded(month_reset_ms, month_reset_ms + QUOTA_GRACE_MS) + policy.quota_args
        count = 2 + 1 + len(keys) + 1 + len(policy.script_args) + 1 + len(tail)
        call = (
            b"*%d\r\n" % count, _packed(_encoded(len(keys), *keys)),
            _packed(policy.script_args), _packed(tail),
        )
        if len(self._calls) >= self.deny_cache_size:
            self._calls.clear()
        self._calls[(tenant_id, key_id, month, month_reset_ms, policy)] = call
        return call

    def _decide(
        self,
        reply: list[int],
        tenant_id: str,
        key_id: str,
        policy: Policy,
        lease_id: str,
        month_reset_ms: int,
        local_now: float,
    ) -> Decision:
        remaining = tuple(reply[i] for i in policy.slots)
        now_ms = reply[3]
        month_s = max(0, math.ceil((month_reset_ms - now_ms) / 1000))
        reset_s = tuple(
            math.ceil(reply[i + 1] / 1_000_000) if i < 8 else (None if i == 8 else month_s)
            for i in policy.slots
        )
        if reply[0] == 1:
            return Decision(True, 200, None, 0, policy, remaining, reset_s, lease_id or None)
        code, retry_us = reply[1], reply[2]
        decision = Decision(
            False, 429, policy.violations[code], max(1, math.ceil(retry_us / 1_000_000)),
            policy, remaining, reset_s,
        )
        if code != 3 and self.deny_cache_size:
            if len(self._denied) >= self.deny_cache_size:
                del self._denied[next(iter(self._denied))]
            until = local_now + min(retry_us // 1000, DENY_CACHE_MAX_MS)
            self._denied[(tenant_id, key_id)] = (until, decision)
        return decision

    def _degraded(self, tenant_id: str, policy: Policy) -> Decision:
        if policy.fail_mode == FAIL_OPEN:
            if self.local.take(tenant_id, policy.local_rate_per_s):
                _DEGRADED_ADMITTED.inc()
                return Decision(True, 200, None, 0, policy, degraded=True)
            _DEGRADED_LIMITED.inc()
            return Decision(False, 429, "local-rate", 1, policy, degraded=True)
        _DEGRADED_REFUSED.inc()
        retry = max(1, math.ceil(self.breaker.reset_s))
        return Decision(False, 503, "unavailable", retry, policy, degraded=True)
