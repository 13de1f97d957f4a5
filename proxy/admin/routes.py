"""Which route groups the admin app serves; each group lives in its own module."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.admin.app import RouteInstaller


def installers() -> tuple[RouteInstaller, ...]:
    """Every admin route group, in the order their routes are added."""
    return ()
