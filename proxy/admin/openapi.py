"""The OpenAPI 3.1 document of the admin routes, built from the route table.

What it promises, and what tests/integration/admin/test_admin_schema.py holds it to with
schemathesis (every check): each parameter and body schema is exactly the rule the
handler enforces, so a request the document calls valid is never refused as
malformed (400) and one it calls invalid never succeeds; every answer's status, media
type, headers and body are documented; every error is the OpenAI-shaped JSON below
with a non-null ``code``; routes in ``admin.public_paths`` need no token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pydantic import BaseModel

    from proxy.admin.api import Param, Route, Schema
    from proxy.config.settings import Settings

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"], "description": "the input at fault"},
                "code": {"type": "string", "description": "stable, for programs to test"},
            },
        }
    },
}
# Answers any admin route may give, beside its own (``Route.errors``).
_COMMON_ERRORS = (
    (400, "bad input (the error names the parameter or field); nothing changed"),
    (404, "unknown id"),
    (409, "conflict with the current state; nothing changed"),
    (503, "the shared store (Redis) cannot be reached; nothing changed"),
)
_BODY_ERRORS = ((413, "request body over 1 MiB"),)


def openapi(routes: Sequence[Route], *, title: str, version: str,
            settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` under ``settings`` (token, limits)."""
    secured = settings.admin.token is not None
    public = frozenset(settings.admin.public_paths)
    schemas: dict[str, Any] = {"Error": _ERROR_SCHEMA}

    def ref(model: type[BaseModel], mode: str) -> dict[str, str]:
        # Answers in serialization mode: a field with a default is still always sent.
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}",
                                         mode="serialization" if mode == "out" else "validation")
        for name, sub in schema.pop("$defs", {}).items():
            schemas[name] = sub
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        names = path_params(route.path)
        given = [p.name for p in route.path_params]
        if given != names:
            raise ValueError(f"{route.method} {route.path}: path parameters {given} != {names}")
        params = [_parameter(p, "path", settings) for p in route.path_params]
        params += [_parameter(p, "query", settings) for p in route.query]
        responses: dict[str, Any] = {str(route.status): _success(route, ref)}
        errors = list(_COMMON_ERRORS) + list(route.errors)
        if route.request is not None:
            errors += _BODY_ERRORS
        for status, why in sorted(errors):
            responses[str(status)] = {"description": why, "content": error}
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": f"{route.method.lower()}_{_slug(route.path)}",
            "tags": list(route.tags),
            "parameters": params,
            "responses": responses,
        }
        if secured and (route.public or route.path in public):
            operation["security"] = []  # admin.public_paths or a public page: no token
        elif secured:
            responses["401"] = {
                "description": "missing, malformed or wrong token",
                "headers": {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
                "content": error,
            }
        if route.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(route.request, "in")}},
            }
        paths.setdefault(_oas_path(route.path), {})[route.method.lower()] = operation
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if secured:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


def _parameter(param: Param, where: str, settings: Settings) -> dict[str, Any]:
    return {"name": param.name, "in": where, "required": where == "path",
            "description": param.description, "schema": param.schema(settings)}


def _success(route: Route, ref: Any) -> Schema:
    if route.response is not None:
        return {"description": "OK",
                "content": {"application/json": {"schema": ref(route.response, "out")}}}
    if route.media_types:
        return {"description": "OK", "content": {
            media: {"schema": {"type": "object" if media == "application/json" else "string"}}
            for media in route.media_types}}
    return {"description": "done"}


def path_params(path: str) -> list[str]:
    """The ``{name}`` placeholders of an aiohttp path, in order."""
    return [part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")]


def _oas_path(path: str) -> str:
    parts = [("{" + p[1:-1].split(":")[0] + "}") if p.startswith("{") else p
             for p in path.split("/")]
    return "/".join(parts)


def _slug(path: str) -> str:
    return "_".join(p.strip("{}").split(":")[0] for p in path.split("/") if p) or "root"
