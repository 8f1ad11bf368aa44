"""Errors that cross the API boundary as RFC 9457 problem+json.

Domain code raises `Problem`; the HTTP layers and the CLI render it. Keeping the status on the
exception means a validation failure deep in a service still surfaces as 422, not 500.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://tollway.dev/problems/"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class Problem(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind or _TITLES.get(status, "error").lower().replace(" ", "-")
        self.title = title or _TITLES.get(status, "Error")
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {
            "type": TYPE_BASE + self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }


def invalid(detail: str, field: str | None = None, **extra: Any) -> Problem:
    if field is not None:
        extra["errors"] = [{"field": field, "message": detail}]
    return Problem(422, detail, kind="validation-error", **extra)


def not_found(what: str, ident: str) -> Problem:
    return Problem(404, f"{what} {ident!r} does not exist", kind="not-found")


def conflict(detail: str, **extra: Any) -> Problem:
    return Problem(409, detail, kind="conflict", **extra)


def problem_response(problem: Problem, instance: str | None = None) -> Response:
    body = problem.body()
    if instance:
        body["instance"] = instance
    return Response(
        orjson.dumps(body), status_code=problem.status, media_type=PROBLEM_JSON,
        headers=problem.headers,
    )
