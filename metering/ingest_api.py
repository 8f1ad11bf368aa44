"""HTTP endpoint for app-reported usage: CloudEvents in structured JSON mode, one or a batch.

The gateway authenticates the tenant's API key and puts the tenant id in the ASGI scope, so
this endpoint never sees a credential; without that scope entry it answers 401. Bodies are
read with a hard cap before parsing, since a batch is parsed whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from clickhouse_connect.driver.exceptions import ClickHouseError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from metering import clickhouse
from metering.ingest import ingest
from metering.meters import Meter, load_meters
from tenancy.problems import Problem, problem_response
from tenancy.settings import Settings

SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
MAX_BODY = 1024 * 1024
MAX_BATCH = 1000
TENANT_SCOPE_KEY = "tollway.tenant_id"
_STATUSES = ("accepted", "duplicate", "rejected")


def ingest_routes(
    settings: Settings, redis: Redis, meters: Mapping[str, Meter] | None = None
) -> list[Route]:
    """`POST /v1/events` for the gateway to mount behind its API-key authentication."""
    known = dict(meters) if meters is not None else load_meters(settings)

    async def events(request: Request) -> Response:
        try:
            return await _handle(request, settings, redis, known)
        except Problem as problem:
            return problem_response(problem, request.url.path)

    return [Route("/v1/events", events, methods=["POST"], name="metering-events")]


async def _handle(
    request: Request, settings: Settings, redis: Redis, meters: Mapping[str, Meter]
) -> Response:
    tenant_id = request.scope.get(TENANT_SCOPE_KEY)
    if not isinstance(tenant_id, str) or not tenant_id:
        raise Problem(401, "an API key of the tenant is required", kind="unauthenticated")
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in (SINGLE, BATCH):
        raise Problem(415, f"send {SINGLE} or {BATCH}", kind="unsupported-media-type")
    try:
        doc = orjson.loads(await _body(request))
    except orjson.JSONDecodeError as exc:
        raise Problem(400, f"malformed JSON: {exc}", kind="malformed-json") from None
    if media == BATCH:
        if not isinstance(doc, list) or not doc:
            raise Problem(400, "a batch is a non-empty JSON array", kind="malformed-batch")
        if len(doc) > MAX_BATCH:
            raise Problem(413, f"at most {MAX_BATCH} events per batch", kind="batch-too-large")
    docs = doc if media == BATCH else [doc]
    try:
        client = await clickhouse.run_blocking(clickhouse.connect, settings)
        outcomes = await ingest(redis, client, meters, tenant_id, docs, datetime.now(UTC))
    except (RedisError, ClickHouseError) as exc:
        raise Problem(503, f"usage store unavailable, retry: {type(exc).__name__}",
                      kind="store-unavailable", headers={"Retry-After": "1"}) from None
    if media == SINGLE:
        one = outcomes[0]
        if one.status == "rejected":
            raise Problem(422, one.reason or "rejected", kind="invalid-event", id=one.id)
        return _json({"id": one.id, "status": one.status}, 200)
    counts = {s: sum(o.status == s for o in outcomes) for s in _STATUSES}
    status = 200 if not counts["rejected"] else 422 if counts["rejected"] == len(outcomes) else 207
    body = {**counts, "results": [o.to_json() for o in outcomes]}
    return _json(body, status)


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise Problem(413, f"body larger than {MAX_BODY} bytes", kind="body-too-large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise Problem(413, f"body larger than {MAX_BODY} bytes", kind="body-too-large")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: Any, status: int) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
