"""Declarative admin routes: one table gives the handlers, validation and OpenAPI.

Every admin route is a ``Route``: method, path, handler, the pydantic models of its
JSON body and answer, and a ``Param`` for each path and query parameter. ``install``
adds them to the admin app; ``proxy/admin/openapi.py`` builds the OpenAPI 3.1 document
from the same table, so the document cannot drift from what is served. Request bodies
are parsed here, once: malformed JSON, unknown fields and wrong types become a 400 that
names the field, and nothing is changed. Each ``Param`` states in JSON Schema the rule
its handler enforces (the handler refuses anything else with a 400 naming it), so a
request the document calls valid is never refused as malformed.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from proxy.core.errors import BadRequest, ProxyError, refusal_for_status

if TYPE_CHECKING:
    from proxy.config.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)
Schema = dict[str, Any]

# Query integers as a client serialises them: ASCII digits, an optional minus. int()
# alone would also take " 7", "+7", "1_000" and non-ASCII digits such as "٣".
_INTEGER: Final = re.compile(r"-?[0-9]+")


class Body(BaseModel):
    """Base of admin request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class Param:
    """A path or query parameter: what it means and its JSON Schema.

    ``schema`` takes the settings because some rules are configurable (e.g. the
    longest session id); it must describe exactly what the handler accepts.
    """

    name: str
    description: str
    schema: Callable[[Settings], Schema]


def integer_param(name: str, description: str, *, lo: int, hi: int) -> Param:
    """An optional integer query parameter in ``lo..hi``, read with ``int_query``."""
    return Param(name, description,
                 lambda _settings: {"type": "integer", "minimum": lo, "maximum": hi})


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # aiohttp syntax, e.g. "/admin/backends/{backend_id}"
    handler: Handler
    summary: str
    response: type[BaseModel] | None = None
    request: type[BaseModel] | None = None
    status: int = 200
    tags: tuple[str, ...] = ()
    path_params: tuple[Param, ...] = ()  # one for each {name} in ``path``
    query: tuple[Param, ...] = ()  # optional query parameters
    # Without a response model: the media types of the answer ("application/json": an
    # object of no fixed schema); neither: 204 No Content.
    media_types: tuple[str, ...] = ()
    errors: tuple[tuple[int, str], ...] = ()  # statuses beyond the common ones, and why


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
    """An optional integer query parameter (see ``integer_param``); a 400 naming it."""
    values = request.query.getall(name, [])
    if not values:
        return default
    if len(values) > 1:
        raise BadRequest(f"query parameter {name} is given {len(values)} times",
                         code="invalid_query", param=name)
    if not _INTEGER.fullmatch(values[0]):
        raise BadRequest(f"query parameter {name} must be an integer", code="invalid_query",
                         param=name)
    value = int(values[0])
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter {name} must be between {lo} and {hi}",
                         code="invalid_query", param=name)
    return value


# Every admin error names a stable code; these stand in where the raiser gave none.
_CODES: Final = {
    400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "request_too_large",
    500: "internal_error", 503: "unavailable",
}


def with_code(exc: ProxyError) -> ProxyError:
    """``exc`` with a stable ``code`` (its own, else one for its status)."""
    if exc.code is None:
        exc.code = _CODES.get(exc.status, str(exc.status))
    return exc


def http_error(exc: web.HTTPException) -> ProxyError:
    """aiohttp's own refusals (no route 404, 405, 413) as an admin error; a 405 keeps
    its ``Allow`` header, which lists the methods the path does serve (RFC 9110)."""
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    message = exc.reason
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"{exc.method} is not served here; allowed: {allowed}"
    return refusal_for_status(exc.status, message, code=_CODES.get(exc.status), headers=headers)
