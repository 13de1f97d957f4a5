"""Which route groups the admin app serves; each group lives in its own module.

A group module exposes ``ROUTES: tuple[Route, ...]``; adding one here serves it
and puts it in the OpenAPI document (``GET /admin/openapi.json``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from proxy.admin import fleet, metrics_routes, sessions
from proxy.admin.api import Route, install, openapi
from proxy.admin.app import DATA_APP
from proxy.app import SETTINGS

if TYPE_CHECKING:
    from proxy.admin.app import RouteInstaller

API_VERSION = "1"


def all_routes() -> tuple[Route, ...]:
    """Every admin route, in the order they are added (the OpenAPI route last)."""
    groups: tuple[tuple[Route, ...], ...] = (sessions.ROUTES, metrics_routes.ROUTES, fleet.ROUTES)
    return (*(route for group in groups for route in group), OPENAPI_ROUTE)


def installers() -> tuple[RouteInstaller, ...]:
    return (_install_all,)


def _install_all(app: web.Application) -> None:
    install(app, all_routes())


async def _openapi(request: web.Request) -> web.StreamResponse:
    secured = request.app[DATA_APP][SETTINGS].admin.token is not None
    document = openapi(all_routes(), title="pinproxy admin API", version=API_VERSION,
                       secured=secured)
    return web.Response(body=orjson.dumps(document), content_type="application/json")


OPENAPI_ROUTE = Route("GET", "/admin/openapi.json", _openapi,
                      "This document: the OpenAPI 3.1 description of the admin API.",
                      tags=("meta",))
