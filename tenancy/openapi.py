"""The admin API's OpenAPI 3.1 document, and the check of request bodies against it.

The request schemas here are the ones the handlers validate with (`check_body`), so the
published contract and the enforced one cannot drift apart. The validator understands only
the JSON Schema subset these schemas use: type, properties, required, additionalProperties
false, enum, format date-time, minimum/maximum, minLength/maxLength and string items.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tenancy.problems import PROBLEM_JSON, invalid

LIFECYCLE_ACTIONS = ("activate", "suspend", "reactivate", "cancel")

_str = {"type": "string"}
_text = {"type": "string", "minLength": 1, "maxLength": 200}
_object = {"type": "object"}
_strings = {"type": "array", "items": {"type": "string"}}
_when = {"type": "string", "format": "date-time"}

REQUEST_SCHEMAS: dict[str, dict[str, Any]] = {
    "TenantCreate": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "email"],
        "properties": {
            "name": {"type": "string", "minLength": 3, "maxLength": 100},
            "email": {"type": "string", "format": "email", "maxLength": 254},
            "plan": _str,
            "region": _str,
            "locale": _str,
            "timezone": _str,
            "currency": {"type": "string", "minLength": 3, "maxLength": 3},
            "metadata": _object,
            "settings": _object,
            "subdomain": _str,
            "domains": _strings,
            "upstream": {"type": "string", "format": "uri"},
        },
    },
    "TenantPatch": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 3, "maxLength": 100},
            "email": {"type": "string", "format": "email", "maxLength": 254},
            "locale": _str,
            "timezone": _str,
            "metadata": _object,
            "settings": _object,
            "subdomain": {"type": ["string", "null"]},
            "domains": _strings,
            "upstream": {"type": ["string", "null"], "format": "uri"},
        },
    },
    "LifecycleAction": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"reason": {"type": "string", "maxLength": 500}},
    },
    "PlanChange": {
        "type": "object",
        "additionalProperties": False,
        "required": ["plan"],
        "properties": {"plan": _str, "version": {"type": "integer", "minimum": 1}},
    },
    "KeyCreate": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "name": _text,
            "scopes": _strings,
            "mode": {"type": "string", "enum": ["live", "test"]},
            "expires_at": _when,
        },
    },
    "KeyRotate": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "overlap_seconds": {"type": "integer", "minimum": 0, "maximum": 30 * 86400},
        },
    },
    "AdminTokenCreate": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "role"],
        "properties": {
            "name": _text,
            "role": {"type": "string", "enum": ["platform", "tenant"]},
            "tenant_id": _str,
            "expires_at": _when,
        },
    },
}

_open_object = {"type": "object", "additionalProperties": True}
RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "format": "uri"},
            "title": _str,
            "status": {"type": "integer"},
            "detail": _str,
            "instance": _str,
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"field": _str, "message": _str},
                },
            },
        },
    },
    "Tenant": {
        **_open_object,
        "properties": {
            "id": _str, "name": _str, "email": _str, "plan_id": _str,
            "plan_version": {"type": "integer"}, "status": _str, "region": _str,
            "locale": _str, "timezone": _str, "currency": _str, "metadata": _object,
            "settings": _object, "subdomain": {"type": ["string", "null"]},
            "domains": _strings, "upstream": {"type": ["string", "null"]},
        },
    },
    "TenantPage": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Tenant"}},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
    "Plan": {
        **_open_object,
        "properties": {
            "plan_id": _str, "version": {"type": "integer"}, "name": _str,
            "limits": _object, "quotas": _object, "features": _object,
        },
    },
    "PlanList": {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Plan"}}},
    },
    "PlanApplyResult": {
        "type": "object",
        "properties": {
            "plans": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "plan_id": _str, "version": {"type": "integer"},
                        "created": {"type": "boolean", "description": "false when unchanged"},
                    },
                },
            }
        },
    },
    "Key": {
        **_open_object,
        "properties": {
            "id": _str, "tenant_id": _str, "name": _str, "mode": _str, "prefix": _str,
            "scopes": _strings, "expires_at": {"type": ["string", "null"]},
            "revoked_at": {"type": ["string", "null"]},
        },
    },
    "KeyWithSecret": {
        "allOf": [
            {"$ref": "#/components/schemas/Key"},
            {
                "type": "object",
                "required": ["secret"],
                "properties": {"secret": {"type": "string", "description": "shown only once"}},
            },
        ]
    },
    "KeyList": {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Key"}}},
    },
    "AdminToken": {
        **_open_object,
        "properties": {
            "id": _str, "name": _str, "role": _str, "tenant_id": {"type": ["string", "null"]},
            "created_at": _when, "expires_at": {"type": ["string", "null"]},
            "revoked_at": {"type": ["string", "null"]},
        },
    },
    "AdminTokenList": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/AdminToken"}}
        },
    },
    "AdminTokenWithSecret": {
        **_open_object,
        "required": ["secret"],
        "properties": {
            "id": _str, "name": _str, "role": _str, "tenant_id": {"type": ["string", "null"]},
            "secret": {"type": "string", "description": "shown only once"},
        },
    },
    "AuditEvent": {
        **_open_object,
        "properties": {
            "seq": {"type": "integer"}, "id": _str, "at": _when, "actor": _str, "type": _str,
            "tenant_id": {"type": ["string", "null"]}, "subject": _str,
            "before": {"type": ["object", "null"]}, "after": {"type": ["object", "null"]},
        },
    },
    "AuditPage": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEvent"}},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {"schema": _ref("Problem")}}}


_COMMON_ERRORS = {
    "401": _problem("missing, unknown, revoked or expired admin token"),
    "500": _problem("unexpected error (no internals are disclosed)"),
}


def _op(
    summary: str,
    ok: tuple[str, str | None],
    *,
    body: str | None = None,
    errors: dict[str, str] | None = None,
    params: list[dict[str, Any]] | None = None,
    platform_only: bool = False,
    body_media: tuple[str, ...] = ("application/json",),
) -> dict[str, Any]:
    status, schema = ok
    ok_response: dict[str, Any] = {"description": "success"}
    if schema is not None:
        ok_response["content"] = {"application/json": {"schema": _ref(schema)}}
    responses: dict[str, Any] = {status: ok_response, **_COMMON_ERRORS}
    if platform_only:
        responses["403"] = _problem("needs a platform admin token")
    for code, text in (errors or {}).items():
        responses[code] = _problem(text)
    if body is not None:
        responses.setdefault("400", _problem("the body is not valid JSON"))
        responses.setdefault("413", _problem("the body is larger than 1 MiB"))
        responses.setdefault("415", _problem("unsupported Content-Type"))
        responses.setdefault("422", _problem("the body does not match the schema"))
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {
            "required": body not in {"LifecycleAction", "KeyCreate", "KeyRotate"},
            "content": {media: {"schema": _ref(body)} for media in body_media},
        }
    return op


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _str}


def _query(name: str, schema: dict[str, Any], text: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": text}


_TENANT = _path_param("tenant_id")
_KEY = _path_param("key_id")
_NOT_FOUND = {"404": "no such tenant, or not visible to this token"}


def _paths() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/tenants": {
            "post": _op(
                "Create (provision) a tenant", ("201", "Tenant"), body="TenantCreate",
                platform_only=True, errors={"409": "subdomain or domain already taken"},
            ),
            "get": _op(
                "List tenants, newest first, with cursor pagination", ("200", "TenantPage"),
                platform_only=True,
                errors={"422": "invalid filter or cursor"},
                params=[
                    _query("q", _str, "search in name and email"),
                    _query("status", _str, "exact lifecycle status"),
                    _query("plan", _str, "plan id"),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "page size"),
                    _query("cursor", _str, "next_cursor of the previous page"),
                ],
            ),
        },
        "/tenants/{tenant_id}": {
            "parameters": [_TENANT],
            "get": _op("Get a tenant", ("200", "Tenant"), errors=_NOT_FOUND),
            "patch": _op(
                "Change a tenant (tenant admins: settings, metadata, locale, timezone only)",
                ("200", "Tenant"), body="TenantPatch",
                errors={**_NOT_FOUND, "403": "field reserved to platform admins",
                        "409": "subdomain or domain already taken"},
            ),
        },
        "/tenants/{tenant_id}/plan": {
            "parameters": [_TENANT],
            "put": _op(
                "Move a tenant to another plan (or plan version)", ("200", "Tenant"),
                body="PlanChange", platform_only=True,
                errors={**_NOT_FOUND, "409": "the change is not allowed in this state"},
            ),
        },
        "/tenants/{tenant_id}/keys": {
            "parameters": [_TENANT],
            "post": _op(
                "Create an API key; the secret is returned once", ("201", "KeyWithSecret"),
                body="KeyCreate", errors=_NOT_FOUND,
            ),
            "get": _op("List a tenant's API keys (never secrets)", ("200", "KeyList"),
                       errors=_NOT_FOUND),
        },
        "/tenants/{tenant_id}/keys/{key_id}": {
            "parameters": [_TENANT, _KEY],
            "delete": _op("Revoke an API key", ("200", "Key"), errors=_NOT_FOUND),
        },
        "/tenants/{tenant_id}/keys/{key_id}/rotate": {
            "parameters": [_TENANT, _KEY],
            "post": _op(
                "Rotate an API key: a new secret, the old one valid for the overlap",
                ("201", "KeyWithSecret"), body="KeyRotate",
                errors={**_NOT_FOUND, "409": "the key is revoked"},
            ),
        },
        "/plans": {
            "get": _op("List plans (latest version of each)", ("200", "PlanList")),
            "post": _op(
                "Apply a plans document (TOML, YAML or JSON); unchanged plans keep their version",
                ("200", "PlanApplyResult"), body="PlansDocument", platform_only=True,
                body_media=("application/json", "application/toml", "application/yaml"),
            ),
        },
        "/plans/{plan_id}": {
            "parameters": [_path_param("plan_id")],
            "get": _op("Get a plan", ("200", "Plan"), errors={"404": "no such plan"}),
        },
        "/admin-tokens": {
            "post": _op(
                "Create an admin token; the secret is returned once",
                ("201", "AdminTokenWithSecret"), body="AdminTokenCreate", platform_only=True,
                errors={"404": "no such tenant"},
            ),
            "get": _op("List admin tokens (never secrets)", ("200", "AdminTokenList"),
                       platform_only=True),
        },
        "/admin-tokens/{token_id}": {
            "parameters": [_path_param("token_id")],
            "delete": _op(
                "Revoke an admin token", ("200", "AdminToken"), platform_only=True,
                errors={"404": "no such admin token",
                        "409": "the last usable platform token cannot be revoked"},
            ),
        },
        "/audit": {
            "get": _op(
                "Audit events, newest first (tenant admins: their tenant only)",
                ("200", "AuditPage"),
                errors={"404": "no such tenant, or not visible to this token",
                        "422": "invalid filter or cursor"},
                params=[
                    _query("tenant_id", _str, "only this tenant's events"),
                    _query("type", _str, "event type, e.g. tenant.suspended"),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "page size"),
                    _query("cursor", _str, "next_cursor of the previous page"),
                ],
            ),
        },
    }
    for action in LIFECYCLE_ACTIONS:
        paths[f"/tenants/{{tenant_id}}/{action}"] = {
            "parameters": [_TENANT],
            "post": _op(
                f"Lifecycle action: {action}", ("200", "Tenant"), body="LifecycleAction",
                platform_only=True,
                errors={**_NOT_FOUND, "409": f"{action} is not allowed from the current status"},
            ),
        }
    paths.update(_usage_paths())
    paths["/openapi.json"] = {
        "get": {
            "summary": "This document (no authentication needed)",
            "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1 document"}},
        }
    }
    return paths


def _usage_paths() -> dict[str, Any]:
    """The usage routes (metering.usage_api), mounted into the admin API by the gateway."""
    period = _query("from", _str, "ISO date or timestamp with offset (default: month start)")
    until = _query("to", _str, "ISO date or timestamp with offset, exclusive (default: month end)")
    tz = _query("tz", _str, "IANA timezone (default: the tenant's)")
    errors = {**_NOT_FOUND, "422": "invalid query parameter"}
    usage_ops = {
        "usage": _op("Usage series per meter", ("200", "UsageSeries"), errors=errors, params=[
            period, until, tz,
            _query("window", {"type": "string", "enum": ["minute", "hour", "day", "month"]},
                   "bucket size"),
            _query("meter", _str, "meter name (repeatable; default all)"),
            _query("group_by", _str, "comma-separated dims"),
        ]),
        "quota": _op("This month's quota use against the plan", ("200", "UsageDocument"),
                     errors=errors),
        "report": _op("Monthly totals compared with the previous month",
                      ("200", "UsageDocument"), errors=errors,
                      params=[_query("period", _str, "YYYY-MM (default: this month)")]),
        "export": _op("Raw usage events as a file", ("200", None), errors=errors, params=[
            period, until, tz,
            _query("format", {"type": "string", "enum": ["csv", "parquet"]}, "file format"),
        ]),
        "analytics": _op("Anomalies, 7-day forecast and plan-fit advice", ("200", "UsageDocument"),
                         errors=errors, params=[
                             _query("meter", _str, "meter (default api_calls)"),
                             _query("threshold", {"type": "number"}, "z-score, 0.5 to 10"),
                             _query("baseline_hours", {"type": "integer"}, "24 to 672"),
                         ]),
    }
    return {
        f"/tenants/{{tenant_id}}/{name}": {"parameters": [_TENANT], "get": op}
        for name, op in usage_ops.items()
    }


def document() -> dict[str, Any]:
    schemas = {
        **REQUEST_SCHEMAS,
        **RESPONSE_SCHEMAS,
        "UsageDocument": {**_open_object, "properties": {"tenant_id": _str}},
        "UsageSeries": {
            **_open_object,
            "properties": {
                "tenant_id": _str, "from": _when, "to": _when, "window": _str, "tz": _str,
                "series": {"type": "array", "items": _open_object},
            },
        },
        "PlansDocument": {
            "type": "object",
            "description": "a plans file: {plans: [...]} or a single plan; see docs/plans.md",
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tollway admin API",
            "version": "1",
            "description": "Tenants, plans, API keys, admin tokens and the audit log. "
            "Errors are application/problem+json (RFC 9457).",
        },
        "servers": [{"url": "/admin/v1"}],
        "security": [{"adminToken": []}],
        "paths": _paths(),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an admin token (platform or tenant role); tenant API keys "
                    "are refused",
                }
            },
        },
    }


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


def check_body(name: str, doc: Any) -> dict[str, Any]:
    """Validate a parsed JSON body against REQUEST_SCHEMAS[name]; 422 names the first bad field."""
    schema = REQUEST_SCHEMAS[name]
    if not isinstance(doc, dict):
        raise invalid("the body must be a JSON object")
    props: dict[str, Any] = schema["properties"]
    for key in doc:
        if key not in props:
            raise invalid(f"unknown field {key!r}", field=key)
    for key in schema.get("required", ()):
        if key not in doc:
            raise invalid(f"field {key!r} is required", field=key)
    for key, value in doc.items():
        _check_value(key, props[key], value)
    return doc


def _check_value(field: str, schema: dict[str, Any], value: Any) -> None:
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    numeric = {"integer", "number"}
    ok = any(
        isinstance(value, _JSON_TYPES[k]) and not (k in numeric and isinstance(value, bool))
        for k in kinds
    )
    if not ok:
        raise invalid(f"field {field!r} must be {' or '.join(kinds)}", field=field)
    if value is None:
        return
    if "enum" in schema and value not in schema["enum"]:
        raise invalid(f"field {field!r} must be one of {schema['enum']}", field=field)
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1 << 30):
            raise invalid(f"field {field!r} has an invalid length", field=field)
        if schema.get("format") == "date-time":
            try:
                datetime.fromisoformat(value)
            except ValueError:
                detail = f"field {field!r} must be an ISO 8601 date-time"
                raise invalid(detail, field=field) from None
    if isinstance(value, int) and not (
        schema.get("minimum", -(1 << 63)) <= value <= schema.get("maximum", 1 << 63)
    ):
        raise invalid(f"field {field!r} is out of range", field=field)
    if isinstance(value, list) and "items" in schema:
        for item in value:
            _check_value(field, schema["items"], item)
