"""Admin routes for backends: list and inspect; add and remove at run time; drain;
push a runtime version; record the controller's intended version.

Every change goes through the ``ControlPlane`` (proxy/fleet/control.py), which persists it
where every replica sharing the store hears it, and applies it here before the
answer is sent: the answer shows the backend as it now is. Inputs are validated
before anything is changed, so a 4xx always means nothing happened.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Final, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from proxy.admin.api import Body, Param, Route, read_body, reply
from proxy.admin.backend_urls import URL_PATTERN, BackendUrlPolicy, Resolver
from proxy.admin.fleet_common import BundleView, Fleet, VersionBody
from proxy.core.errors import BadRequest
from proxy.core.models import Backend
from proxy.fleet.control import UnknownBackend

if TYPE_CHECKING:
    from proxy.core.models import BackendState

# The same rule the config file applies to ids and regions (proxy/config/settings.py).
_ID: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_ID_RE: Final = re.compile(_ID)
_TAGS = ("backends",)
# How an added backend's host name is resolved (tests give a resolver without DNS).
RESOLVER: Final = web.AppKey("backend_resolver", Resolver)
BACKEND_ID: Final = Param("backend_id", "a backend id, as in the config (1-64 of [A-Za-z0-9._-])",
                          lambda _settings: {"type": "string", "pattern": _ID})


class HealthTransitionView(BaseModel):
    at: float = Field(description="wall-clock seconds since the epoch")
    healthy: bool
    why: str


class BackendView(BaseModel):
    """One backend: where it is, what its runtime reports, what was intended, its load."""

    id: str
    region: str
    url: str
    version_source: Literal["poll", "push"] = Field(
        description="poll: /version is polled; push: versions arrive via runtime-version"
    )
    added_at_runtime: bool = Field(description="added through the admin API, not the config")
    runtime: BundleView | None = Field(
        description="what the runtime last reported; routing uses this and nothing else"
    )
    reported_at: float | None = Field(description="when it was last reported (wall clock)")
    report_source: Literal["poll", "stamp", "push"] | None = Field(
        description="how it was last reported: /version poll, response stamp, or admin push"
    )
    intended: BundleView | None = Field(description="the rollout controller's intent")
    drift: bool = Field(description="an intent is set and the runtime reports another version")
    healthy: bool
    health_history: list[HealthTransitionView] = Field(description="transitions, oldest first")
    latency_ewma_ms: float = Field(description="peak-EWMA time to first byte")
    in_flight: int
    draining: bool = Field(description="takes no new sessions; its pinned sessions continue")


class BackendList(BaseModel):
    backends: list[BackendView]


class AddBackendBody(Body):
    model_config = ConfigDict(strict=True)

    id: Annotated[str, Field(pattern=_ID)]
    region: Annotated[str, Field(pattern=_ID)]
    # Checked by BackendUrlPolicy (a 400 naming what is wrong); the pattern documents it.
    url: Annotated[str, Field(max_length=2048, json_schema_extra={"pattern": URL_PATTERN})]
    version_source: Literal["poll", "push"] = "poll"


def backend_view(fleet: Fleet, state: BackendState) -> BackendView:
    """The admin view of one backend: registry state, intent, health history and load."""
    registry = fleet.registry
    runtime = None if state.version is None else BundleView.of(state.version, registry)
    intended = None if state.intended is None else BundleView.of(state.intended, registry)
    return BackendView(
        id=state.id,
        region=state.region,
        url=state.backend.url,
        version_source=state.backend.version_source,
        added_at_runtime=fleet.control.added_at_runtime(state.id),
        runtime=runtime,
        reported_at=state.reported_at,
        report_source=state.report_source,
        intended=intended,
        drift=intended is not None and (runtime is None or runtime.key != intended.key),
        healthy=state.healthy,
        health_history=[
            HealthTransitionView(at=at, healthy=healthy, why=why)
            for at, healthy, why in registry.health_history(state.id)
        ],
        latency_ewma_ms=fleet.loads.ewma_s(state.id) * 1000.0,
        in_flight=fleet.loads.inflight(state.id),
        draining=state.draining,
    )


def _backend_id(request: web.Request) -> str:
    """The path's backend id; a 400 unless it follows the id rule (BACKEND_ID)."""
    backend_id = request.match_info["backend_id"]
    if not _ID_RE.fullmatch(backend_id):
        raise BadRequest("backend_id must be 1-64 of A-Z a-z 0-9 . _ - (starting alphanumeric)",
                         code="invalid_backend_id", param="backend_id")
    return backend_id


def _state(fleet: Fleet, backend_id: str) -> BackendState:
    state = fleet.registry.snapshot.by_id.get(backend_id)
    if state is None:
        raise UnknownBackend(backend_id)
    return state


def _view_of(fleet: Fleet, backend_id: str) -> web.Response:
    return reply(backend_view(fleet, _state(fleet, backend_id)))


async def _list_backends(request: web.Request) -> web.StreamResponse:
    fleet = Fleet.of(request)
    views = [backend_view(fleet, s) for s in fleet.registry.snapshot.backends]
    return reply(BackendList(backends=views))


async def _get_backend(request: web.Request) -> web.StreamResponse:
    return _view_of(Fleet.of(request), _backend_id(request))


async def _add_backend(request: web.Request) -> web.StreamResponse:
    fleet = Fleet.of(request)
    body = await read_body(request, AddBackendBody)
    url = await BackendUrlPolicy(fleet.settings.admin, request.app[RESOLVER]).check(body.url)
    await fleet.control.add_backend(Backend(body.id, body.region, url, body.version_source))
    return reply(backend_view(fleet, _state(fleet, body.id)), status=201)


async def _remove_backend(request: web.Request) -> web.StreamResponse:
    await Fleet.of(request).control.remove_backend(_backend_id(request))
    return web.Response(status=204)


async def _drain(request: web.Request) -> web.StreamResponse:
    fleet, backend_id = Fleet.of(request), _backend_id(request)
    await fleet.control.set_draining(backend_id, True)
    return _view_of(fleet, backend_id)


async def _undrain(request: web.Request) -> web.StreamResponse:
    fleet, backend_id = Fleet.of(request), _backend_id(request)
    await fleet.control.set_draining(backend_id, False)
    return _view_of(fleet, backend_id)


async def _push_runtime_version(request: web.Request) -> web.StreamResponse:
    fleet, backend_id = Fleet.of(request), _backend_id(request)
    _state(fleet, backend_id)  # 404 before a body problem is reported for a missing id
    body = await read_body(request, VersionBody)
    await fleet.control.push_version(backend_id, body.bundle())
    return _view_of(fleet, backend_id)


async def _set_intended_version(request: web.Request) -> web.StreamResponse:
    fleet, backend_id = Fleet.of(request), _backend_id(request)
    _state(fleet, backend_id)
    body = await read_body(request, VersionBody)
    await fleet.control.set_intent(backend_id, body.bundle())
    return _view_of(fleet, backend_id)


async def _clear_intended_version(request: web.Request) -> web.StreamResponse:
    fleet, backend_id = Fleet.of(request), _backend_id(request)
    await fleet.control.set_intent(backend_id, None)
    return _view_of(fleet, backend_id)


_ONE = "/admin/backends/{backend_id}"
_P = (BACKEND_ID,)
ROUTES: tuple[Route, ...] = (
    Route("GET", "/admin/backends", _list_backends,
          "Every backend with its runtime version, intent, health and load.",
          BackendList, tags=_TAGS),
    Route("POST", "/admin/backends", _add_backend,
          "Add a backend at run time (URL checked against admin.backend_networks); "
          "every replica starts polling it.",
          BackendView, AddBackendBody, status=201, tags=_TAGS,
          errors=((403, "the URL's host is refused by the backend address policy"),)),
    Route("GET", _ONE, _get_backend, "One backend.", BackendView, tags=_TAGS, path_params=_P),
    Route("DELETE", _ONE, _remove_backend,
          "Remove a backend at run time; its pinned sessions wait for another backend "
          "of their version.",
          None, status=204, tags=_TAGS, path_params=_P),
    Route("POST", f"{_ONE}/drain", _drain,
          "Drain: no new sessions; sessions pinned to its version keep using it.",
          BackendView, tags=_TAGS, path_params=_P),
    Route("DELETE", f"{_ONE}/drain", _undrain, "Undrain: take new sessions again.",
          BackendView, tags=_TAGS, path_params=_P),
    Route("PUT", f"{_ONE}/runtime-version", _push_runtime_version,
          "Push the runtime's version (for backends that cannot serve /version); a "
          "runtime report like a poll: the latest report wins.",
          BackendView, VersionBody, tags=_TAGS, path_params=_P),
    Route("PUT", f"{_ONE}/intended-version", _set_intended_version,
          "Record the rollout controller's intended version; shown beside the runtime "
          "(drift), never used for routing.",
          BackendView, VersionBody, tags=_TAGS, path_params=_P),
    Route("DELETE", f"{_ONE}/intended-version", _clear_intended_version,
          "Forget the intended version.", BackendView, tags=_TAGS, path_params=_P),
)  # fmt: skip
