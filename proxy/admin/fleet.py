"""The fleet admin routes as one group: backends (proxy/admin/backends.py) and
versions, the kill switch, rollback and traffic (proxy/admin/versions.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.admin import backends, versions

if TYPE_CHECKING:
    from proxy.admin.api import Route

ROUTES: tuple[Route, ...] = (*backends.ROUTES, *versions.ROUTES)
