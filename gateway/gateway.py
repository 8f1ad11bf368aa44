"""The proxied hot path as one raw ASGI callable, and the lifecycle of what it uses.

Per request, in this order, so nothing is charged for a request that fails an earlier step:

1. size limits (431/413), before anything costs the tenant;
2. tenant resolution and authentication (400/401/403), lifecycle gate (402/403/404/503) and
   route scopes (403) — all from the in-process snapshot, no store query;
3. admission: the one Redis round trip before proxying (429/503);
4. the proxy, with the signed tenant header upstream and RateLimit headers downstream;
5. after the response: the lease is released, usage events emitted (in memory), the key's
   last use noted (in memory), metrics and one access-log line.

Anything derived from the plan (`Policy`) is computed once per plan version, not per request;
the metrics tenant allow-list once per snapshot. See docs/gateway.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import time
from collections.abc import Sequence
from decimal import Decimal

import orjson
from sqlalchemy import Engine
from starlette.types import ASGIApp

from gateway import observability, ratelimit_headers
from gateway.admission import Admission, Decision, Policy, month_window
from gateway.forwarding import Header
from gateway.jwt_auth import JwtVerifier
from gateway.observability import RequestMetrics, TenantLabels
from gateway.proxy import (
    CLIENT_CLOSED,
    Message,
    Proxy,
    ProxyResult,
    Receive,
    Scope,
    Send,
    check_limits,
    send_problem,
)
from gateway.resolution import Resolved, Resolver
from gateway.routing import Routing, no_upstream
from gateway.snapshot import Snapshot, TenantRecord
from gateway.snapshot_refresher import SnapshotRefresher
from gateway.status_gate import check_status
from gateway.tenant_signature import HEADER as TENANT_HEADER
from gateway.tenant_signature import TenantSigner
from gateway.usage_emitter import UsageEmitter
from metering.events import UsageEvent
from metering.ingest_api import TENANT_SCOPE_KEY
from tenancy.hotstate import redis_url
from tenancy.key_usage import LastUsed
from tenancy.plans import Plan
from tenancy.problems import PROBLEM_JSON, Problem
from tenancy.settings import Settings

log = logging.getLogger("tollway.gateway")

REQUEST_METER = "api_calls"
LAST_USED_FLUSH_S = 30.0
JWKS_REFRESH_S = 300.0
CLOSE_REFRESHER_S = 2.0
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
_X_REQUEST_ID = b"x-request-id"
_PROBLEM_TYPE = PROBLEM_JSON.encode()


class Gateway:
    """`await gateway(scope, receive, send)` for http scopes, between `start()` and `close()`."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        admission: Admission,
        emitter: UsageEmitter,
        signer: TenantSigner,
        redis_url: str | None = None,
    ) -> None:
        self.settings = settings
        self.jwt = JwtVerifier(settings)
        self.resolver = Resolver(settings, self.jwt)
        self.refresher = SnapshotRefresher(engine, settings, redis_url, on_swap=self._swapped)
        self.admission = admission
        self.proxy = Proxy(settings)
        self.signer = signer
        self.emitter = emitter
        self.last_used = LastUsed()
        self.routing = Routing(settings)
        self.labels = TenantLabels()
        self.metrics = RequestMetrics()
        self._engine = engine
        self._policies: dict[tuple[str, int], Policy] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self.started = False

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine) -> Gateway:
        observability.setup_access_log()
        return cls(
            settings, engine,
            admission=Admission.from_settings(settings),
            emitter=UsageEmitter.from_settings(settings),
            signer=TenantSigner.from_settings(settings),
            redis_url=redis_url(settings),
        )

    async def start(self) -> None:
        """Load the first snapshot (a failure propagates: there is nothing to serve), then
        start the usage flusher, the last-used flusher and the JWKS warm-up."""
        await self.refresher.start()
        self.labels.update(self.refresher.snapshot)
        self.emitter.start()
        self._background.append(asyncio.create_task(
            self.last_used.run(self._engine, LAST_USED_FLUSH_S), name="key-last-used"))
        self._background.append(asyncio.create_task(self._warm_jwks(), name="jwks-warm"))
        self.started = True

    async def close(self) -> None:
        """Stop taking work from the background loops and hand over what is buffered: the
        last-used batch is written, pending usage events are flushed (or spooled)."""
        self.started = False
        try:
            # Bounded: redis-py 8.1 can leave a pub/sub listener cancelled mid-subscribe
            # waiting forever; shutdown must not hang on it.
            await asyncio.wait_for(self.refresher.close(), CLOSE_REFRESHER_S)
        except TimeoutError:
            log.warning("snapshot refresher did not stop within %.0fs", CLOSE_REFRESHER_S)
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.proxy.close()
        await self.admission.close()
        await self.emitter.aclose()
        await self.jwt.close()
        observability.flush_access_log()

    def _swapped(self, snapshot: Snapshot) -> None:
        self.labels.update(snapshot)

    async def _warm_jwks(self) -> None:
        while True:
            try:
                await self.jwt.warm(self.refresher.snapshot, max_age_s=JWKS_REFRESH_S)
            except Exception as exc:  # an IdP outage must not stop the refreshes
                log.warning("JWKS warm-up failed: %s", exc)
            await asyncio.sleep(JWKS_REFRESH_S / 2)

    def policy(self, plan: Plan) -> Policy:
        """One Policy per plan version: a version's limits never change, and admission's
        caches are keyed on the Policy object, so reusing it keeps them warm."""
        key = (plan.plan_id, plan.version)
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = Policy.from_plan(plan, request_meter=REQUEST_METER)
        return policy

    async def _gate(
        self, scope: Scope, headers: Sequence[Header], now: float
    ) -> tuple[Resolved | None, Problem | None]:
        """Steps 1-2 for proxied traffic and Tollway's own tenant endpoints alike: size
        limits, then the tenant and credential from the snapshot, then the lifecycle gate."""
        problem = check_limits(headers, self.settings)
        if problem is not None:
            return None, problem
        try:
            resolved = await self.resolver.resolve(scope, self.refresher.snapshot, now)
        except Problem as refused:
            return None, refused
        return resolved, check_status(resolved.tenant, now)

    async def _refuse(
        self, scope: Scope, send: Send, request_id: str, resolved: Resolved | None,
        problem: Problem, started: float, rid: Header,
    ) -> None:
        size = await send_problem(send, problem, (rid,))
        tenant = resolved.tenant if resolved is not None else None
        self._done(scope, request_id, tenant, problem.status, started, None, 0, size,
                   problem.kind)

    async def authenticated(
        self, scope: Scope, receive: Receive, send: Send, app: ASGIApp
    ) -> None:
        """Serve one of Tollway's own tenant endpoints (usage ingestion) behind the same
        resolution, credential and lifecycle checks as proxied traffic, minus admission and
        the proxy. The tenant reaches `app` as scope["tollway.tenant_id"]."""
        started = time.perf_counter()
        now = time.time()
        headers: Sequence[Header] = scope["headers"]
        request_id, headers, _ = _request_id(headers)
        resolved, problem = await self._gate(scope, headers, now)
        if problem is not None:
            rid = (_X_REQUEST_ID, request_id.encode("ascii"))
            await self._refuse(scope, send, request_id, resolved, problem, started, rid)
            return
        assert resolved is not None
        tenant = resolved.tenant
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await app({**scope, TENANT_SCOPE_KEY: tenant.id}, receive, capture)
        self._done(scope, request_id, tenant, status, started, None, 0, 0, None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"the gateway serves http scopes, not {scope['type']!r}")
        started = time.perf_counter()
        now = time.time()
        headers: Sequence[Header] = scope["headers"]
        request_id, headers, upstream_extra = _request_id(headers)
        rid = (_X_REQUEST_ID, request_id.encode("ascii"))

        resolved, problem = await self._gate(scope, headers, now)
        if problem is not None:
            await self._refuse(scope, send, request_id, resolved, problem, started, rid)
            return
        assert resolved is not None
        tenant = resolved.tenant
        assert tenant.plan is not None  # the status gate saw to it

        policy = self.policy(tenant.plan)
        month, reset_ms = month_window(tenant.tz, int(now * 1000))
        admit_started = time.perf_counter()
        decision = await self.admission.admit(
            tenant.id, resolved.subject, policy, month=month, month_reset_ms=reset_ms
        )
        self.metrics.admission(decision, time.perf_counter() - admit_started)
        limit_headers = ratelimit_headers.headers(decision)
        limit_headers.append(rid)
        if not decision.allowed:
            size = await _send_refusal(send, decision, limit_headers)
            self._done(scope, request_id, tenant, decision.status, started, None, 0, size,
                       decision.violated)
            return

        upstream = self.routing.upstream(tenant)
        result: ProxyResult | None = None
        try:
            if upstream is None:
                problem = no_upstream()
                size = await send_problem(send, problem, limit_headers)
                self._done(scope, request_id, tenant, 503, started, None, 0, size, problem.kind)
                return
            upstream_extra.append(
                (TENANT_HEADER, self.signer.sign(tenant.id, resolved.subject, now)))
            result = await self.proxy.forward(
                scope, receive, send,
                upstream=upstream,
                path=resolved.raw_path,
                query=scope.get("query_string", b""),
                headers=headers,
                upstream_headers=upstream_extra,
                extra_response_headers=limit_headers,
                limits_checked=True,
            )
        except BaseException as exc:  # cancelled (client gone, shutdown) or a bug: still logged
            gone = isinstance(exc, asyncio.CancelledError)
            self._done(scope, request_id, tenant, CLIENT_CLOSED if gone else 500, started, None,
                       0, 0, "cancelled" if gone else "gateway-error")
            raise
        finally:
            self.admission.release_later(tenant.id, decision.lease_id)
        assert result is not None
        self._proxied(scope, request_id, resolved, decision, result, now, started, month, reset_ms)

    def _proxied(
        self, scope: Scope, request_id: str, resolved: Resolved, decision: Decision,
        result: ProxyResult, now: float, started: float, month: str, reset_ms: int,
    ) -> None:
        tenant = resolved.tenant
        elapsed = time.perf_counter() - started
        status = result.status
        if status in (502, 504) and (result.aborted or result.upstream_ms == 0.0):
            observability.upstream_error(
                "cut" if result.aborted else ("timeout" if status == 504 else "connect"))
        route = self.routing.template(tenant, resolved.path)
        subject = resolved.subject
        method = scope["method"]
        time_ms = int(now * 1000)
        latency_ms = round(elapsed * 1000, 3)
        dims = {"request_id": request_id}
        emit = self.emitter.emit
        emit(UsageEvent(
            tenant.id, REQUEST_METER, subject, time_ms, Decimal(1), route, method, status,
            latency_ms, result.bytes_in, result.bytes_out, dims,
        ))
        if result.units:
            for meter, units in result.units.items():
                emit(UsageEvent(tenant.id, meter, subject, time_ms, units, route, method, status,
                                latency_ms, 0, 0, dims))
            self._charge_reported(tenant.id, decision.policy, result.units, month, reset_ms)
        if resolved.key is not None:
            self.last_used.touch(resolved.key.id)
        upstream_s = result.upstream_ms / 1000 if result.upstream_ms else None
        self.metrics.request(status, self.labels.label(tenant.id), elapsed, upstream_s)
        observability.log_access({
            "request_id": request_id, "tenant_id": tenant.id, "method": method,
            "route": route, "status": status, "latency_ms": latency_ms,
            "upstream_ms": round(result.upstream_ms, 3), "bytes_in": result.bytes_in,
            "bytes_out": result.bytes_out, "aborted": result.aborted,
        })

    def _done(
        self, scope: Scope, request_id: str, tenant: TenantRecord | None, status: int,
        started: float, upstream_s: float | None, bytes_in: int, bytes_out: int,
        reason: str | None,
    ) -> None:
        """Metrics and the access line of a request the gateway answered itself."""
        elapsed = time.perf_counter() - started
        tenant_id = None if tenant is None else tenant.id
        self.metrics.request(status, self.labels.label(tenant_id), elapsed, upstream_s)
        observability.log_access({
            "request_id": request_id, "tenant_id": tenant_id, "method": scope["method"],
            "status": status, "latency_ms": round(elapsed * 1000, 3), "upstream_ms": 0,
            "bytes_in": bytes_in, "bytes_out": bytes_out, "reason": reason,
        })

    def _charge_reported(
        self, tenant_id: str, policy: Policy, units: dict[str, Decimal], month: str,
        reset_ms: int,
    ) -> None:
        """Add upstream-reported units to the monthly counters that admission only checks
        (e.g. `ai_interactions`), after the response and without waiting for it."""
        charges = [(meter, math.ceil(units[meter])) for meter, _, inc in policy.quotas
                   if inc == 0 and units.get(meter)]
        if charges:
            task = asyncio.get_running_loop().create_task(
                self.admission.charge(tenant_id, charges, month, reset_ms))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _request_id(
    headers: Sequence[Header],
) -> tuple[str, Sequence[Header], list[Header]]:
    """A valid client `X-Request-Id` is kept (and forwarded as sent); otherwise a fresh one
    is made and sent upstream, and an invalid client value is dropped from the headers."""
    for name, value in headers:
        if name == _X_REQUEST_ID:
            if _REQUEST_ID.fullmatch(value) is not None:
                return value.decode("ascii"), headers, []
            headers = [(n, v) for n, v in headers if n != _X_REQUEST_ID]
            break
    request_id = f"{random.getrandbits(64):016x}"  # an id, not a secret
    return request_id, headers, [(b"X-Request-Id", request_id.encode())]


async def _send_refusal(send: Send, decision: Decision, headers: list[Header]) -> int:
    body = orjson.dumps(ratelimit_headers.problem(decision))
    await send({
        "type": "http.response.start", "status": decision.status,
        "headers": [(b"content-type", _PROBLEM_TYPE),
                    (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return len(body)

