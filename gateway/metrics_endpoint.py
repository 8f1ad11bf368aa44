"""Prometheus exposition of the process's default registry.

Metrics are defined next to the code they count (admission, proxy, usage emission); this
endpoint only renders them, so adding a metric never touches this file.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.requests import Request
from starlette.responses import Response


async def metrics(request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
