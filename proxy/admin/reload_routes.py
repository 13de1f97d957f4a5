"""``POST /admin/reload``: re-read the config file and apply it live (proxy/app/reload.py).

Answers 200 with what changed (``unchanged`` when the file says what is running);
refuses an invalid file with ``422 invalid_config`` and a change that needs a restart
with ``409 restart_required``, both naming the fields in ``param`` and ``fields``. A
refused reload changes nothing. With several workers, the worker that answers also
has the others reload.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from proxy.admin.api import Route, reply
from proxy.admin.app import SERVICES
from proxy.core.errors import Conflict

if TYPE_CHECKING:
    from aiohttp import web


class ReloadView(BaseModel):
    status: Literal["applied", "unchanged"]
    changed: list[str] = Field(description="dotted paths of the settings that changed")
    backends_added: list[str]
    backends_removed: list[str]
    backends_changed: list[str] = Field(
        description="same id, another URL, region or version source: started afresh")


async def _reload(request: web.Request) -> web.StreamResponse:
    reloader = request.app[SERVICES].reloader
    if reloader is None:
        raise Conflict("this proxy was not started from a config file: nothing to re-read",
                       code="reload_unavailable")
    result = await reloader.reload(tell_peers=True)  # or raises ReloadRefused (4xx)
    plan = result.plan
    return reply(ReloadView(
        status=result.status, changed=list(plan.changed),
        backends_added=list(plan.backends_added), backends_removed=list(plan.backends_removed),
        backends_changed=list(plan.backends_changed),
    ))


ROUTES: tuple[Route, ...] = (
    Route("POST", "/admin/reload", _reload,
          "Re-read the config file and apply backends and routing/session policies live; "
          "an invalid file, or one changing a setting that needs a restart, is refused "
          "naming the fields, and the running config stays.",
          ReloadView, tags=("config",),
          errors=((409, "a changed setting needs a restart (restart_required), or there is "
                        "no config file (reload_unavailable)"),
                  (422, "the file is unreadable or invalid (invalid_config)"))),
)  # fmt: skip
