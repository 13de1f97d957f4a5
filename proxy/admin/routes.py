"""Which route groups the admin app serves; each group lives in its own module.

A group module exposes ``ROUTES: tuple[Route, ...]``; adding one here serves it
and puts it in the OpenAPI document (``GET /admin/openapi.json``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from proxy.admin import fleet, metrics_routes, reload_routes, rollout_routes, sessions
from proxy.admin.api import Route, install
from proxy.admin.app import SERVICES
from proxy.admin.backend_urls import Resolver, system_resolve
from proxy.admin.backends import RESOLVER
from proxy.admin.openapi import openapi

if TYPE_CHECKING:
    from proxy.admin.app import RouteInstaller

API_VERSION = "1"


def all_routes() -> tuple[Route, ...]:
    """Every admin route, in the order they are added (the OpenAPI route last)."""
    groups: tuple[tuple[Route, ...], ...] = (
        sessions.ROUTES, metrics_routes.ROUTES, fleet.ROUTES, rollout_routes.ROUTES,
        reload_routes.ROUTES,
    )
    return (*(route for group in groups for route in group), OPENAPI_ROUTE)


def installers(resolve: Resolver = system_resolve) -> tuple[RouteInstaller, ...]:
    """What the admin app serves; ``resolve`` looks up added backends' host names."""

    def install_all(app: web.Application) -> None:
        app[RESOLVER] = resolve
        install(app, all_routes())

    return (install_all,)


async def _openapi(request: web.Request) -> web.StreamResponse:
    document = openapi(all_routes(), title="pinproxy admin API", version=API_VERSION,
                       settings=request.app[SERVICES].settings)
    return web.Response(body=orjson.dumps(document), content_type="application/json")


OPENAPI_ROUTE = Route("GET", "/admin/openapi.json", _openapi,
                      "This document: the OpenAPI 3.1 description of the admin API.",
                      tags=("meta",), media_types=("application/json",))
