"""The fleet admin routes as one group: backends (proxy/admin/backends.py) and
versions, the kill switch and rollback (proxy/admin/versions.py), and the traffic
distributions (proxy/admin/traffic_routes.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.admin import backends, traffic_routes, versions

if TYPE_CHECKING:
    from proxy.admin.api import Route

ROUTES: tuple[Route, ...] = (*backends.ROUTES, *versions.ROUTES, *traffic_routes.ROUTES)
