"""Declarative admin routes: one table gives the handlers, validation and OpenAPI.

Every admin route is a ``Route``: method, path, handler, and the pydantic models of
its JSON body and answer. ``install`` adds them to the admin app; ``openapi``
builds the OpenAPI 3.1 document from the same table, so the document cannot drift
from what is served. Request bodies are parsed here, once: malformed JSON, unknown
fields and wrong types become a 400 that names the field, and nothing is changed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from proxy.errors import BadRequest

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)


class Body(BaseModel):
    """Base of admin request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # aiohttp syntax, e.g. "/admin/backends/{backend_id}"
    handler: Handler
    summary: str
    response: type[BaseModel] | None = None  # None: 204 No Content
    request: type[BaseModel] | None = None
    status: int = 200
    tags: tuple[str, ...] = ()
    query: Sequence[tuple[str, str]] = field(default=())  # optional (name, description)
    media_type: str | None = None  # a non-JSON answer (e.g. "text/plain"), when response is None


def install(app: web.Application, routes: Sequence[Route]) -> None:
    for route in routes:
        app.router.add_route(route.method, route.path, route.handler)


async def read_body(request: web.Request, model: type[M]) -> M:
    """Parse and validate the JSON body; a 400 naming the field on any problem."""
    raw = await request.read()
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(body)"
        raise BadRequest(f"{where}: {first['msg']}", code="invalid_field", param=where) from exc


def reply(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(model.model_dump(mode="json")),
        content_type="application/json",
    )


def int_query(request: web.Request, name: str, default: int, *, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadRequest(f"query parameter {name} must be an integer", param=name) from exc
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter {name} must be between {lo} and {hi}", param=name)
    return value


_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def openapi(routes: Sequence[Route], *, title: str, version: str, secured: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``."""
    schemas: dict[str, Any] = {"Error": _ERROR_SCHEMA}
    paths: dict[str, dict[str, Any]] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            schemas[name] = sub
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for route in routes:
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _path_params(route.path)
        ] + [
            {"name": name, "in": "query", "required": False, "description": desc,
             "schema": {"type": "string"}}
            for name, desc in route.query
        ]
        responses: dict[str, Any] = {}
        if route.response is None and route.media_type is not None:
            responses[str(route.status)] = {
                "description": "OK",
                "content": {route.media_type: {"schema": {"type": "string"}}},
            }
        elif route.response is None:
            responses[str(route.status)] = {"description": "done"}
        else:
            responses[str(route.status)] = {
                "description": "OK",
                "content": {"application/json": {"schema": ref(route.response)}},
            }
        for status, why in (
            ("400", "bad input"),
            ("404", "unknown id"),
            ("409", "conflict"),
            ("503", "the shared store (Redis) cannot be reached; nothing changed"),
        ):
            responses[status] = {"description": why, "content": error}
        if secured:
            responses["401"] = {"description": "missing or wrong token", "content": error}
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": f"{route.method.lower()}_{_slug(route.path)}",
            "tags": list(route.tags),
            "parameters": params,
            "responses": responses,
        }
        if route.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(route.request)}},
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


def _path_params(path: str) -> list[str]:
    return [part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")]


def _oas_path(path: str) -> str:
    parts = [("{" + p[1:-1].split(":")[0] + "}") if p.startswith("{") else p
             for p in path.split("/")]
    return "/".join(parts)


def _slug(path: str) -> str:
    return "_".join(p.strip("{}").split(":")[0] for p in path.split("/") if p) or "root"
