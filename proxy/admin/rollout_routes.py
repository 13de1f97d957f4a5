"""Admin routes for the rollout discipline (proxy/core/rollout.py): the rollout picture, an
operator's forced cutover, the coordinated rollback, and eval results for the soak."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Final

from pydantic import BaseModel, Field, field_validator

from proxy.admin.api import Body, Param, Route, int_query, integer_param, read_body, reply
from proxy.admin.app import SERVICES
from proxy.admin.fleet_common import VERSION, Fleet, matches, version_ref, version_ref_schema
from proxy.core.errors import BadRequest, Conflict, NotFound
from proxy.core.models import DIMENSIONS
from proxy.fleet.rollout_store import RolloutUnavailable

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.core.rollout import RolloutEvent
    from proxy.fleet.rollout_control import RolloutController

_TAGS = ("rollout",)
_ID: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_ID_RE: Final = re.compile(_ID)
REGION: Final = Param("region", "a region id, as in the config (1-64 of [A-Za-z0-9._-])",
                      lambda _settings: {"type": "string", "pattern": _ID})
TARGET: Final = Param("target", VERSION.description.replace("a version key", "the target"),
                      VERSION.schema)


class EventView(BaseModel):
    at: float = Field(description="wall-clock seconds")
    kind: str = Field(description="initialised, flipped, held_back, soak_passed, regression, "
                                  "rolled_back or forced")
    region: str
    version: str
    detail: dict[str, Any] = Field(description="the evidence: reasons, counts, rates, z")
    replica: str | None = Field(description="the pinproxy replica that took the decision "
                                "(host/pid/suffix)")


class RegionView(BaseModel):
    region: str
    mode: str = Field(description="atomic or per_replica")
    state: str = Field(description="steady, mixed, soaking or halted")
    current: str = Field(description="the version new sessions in this region get")
    since: float
    previous: str | None
    soak_until: float | None = Field(description="when the soak ends, while soaking")
    candidate: str | None = Field(description="what every replica reports, not yet current")
    held: str | None = Field(description="why the candidate is held back")
    halted: str | None = Field(description="the version a regression or rollback halted")
    replicas: dict[str, int] = Field(description="healthy replicas per version key")


class RolloutView(BaseModel):
    regions: list[RegionView]
    blocked: list[str]
    rollbacks: dict[str, str] = Field(description="rolled-back version -> repin target")
    events: list[EventView] = Field(description="the latest decisions of every replica, "
                                    "oldest first")
    events_complete: bool = Field(description="false: the shared store could not be read, "
                                  "and events lists only this replica's own decisions")
    events_error: str | None = Field(description="why events is incomplete (a stable code)")


class RollbackTarget(BaseModel):
    id: str
    region: str
    runtime: str = Field(description="the version key its runtime reports now")
    intended: str | None = Field(description="the controller's intent, where it differs")
    target: str = Field(description="what this backend's region rolls back to")


class RollbackResult(BaseModel):
    version: str
    to: str
    events: list[EventView]
    backends: list[RollbackTarget] = Field(
        description="backends whose runtime still reports the version: roll these back")
    already_there: list[str] = Field(description="regions that already run the target: no-op")
    rollbacks: dict[str, str]


# The body names versions as the path does. Its schema is over every dimension (the
# body models are built once, not per config); the handler then refuses a dimension
# outside versions.dimensions with 400 invalid_version naming "from" or "to", as the
# path's version_ref does for "version".
_BODY_VERSION: Final = str(version_ref_schema(DIMENSIONS)["pattern"])


class RollbackBody(Body):
    """``{"from", "to"}``: what POST /admin/rollback rolls back, and to what."""

    bad: str = Field(alias="from", pattern=_BODY_VERSION,
                     description="the version to roll back (key or bare prompt)")
    to: str = Field(pattern=_BODY_VERSION,
                    description="the version to return to (key or bare prompt)")


class EvalsBody(Body):
    passed: Annotated[int, Field(ge=0, le=1_000_000_000)]
    failed: Annotated[int, Field(ge=0, le=1_000_000_000)]

    @field_validator("passed", "failed", mode="before")
    @classmethod
    def _not_a_bool(cls, value: object) -> object:
        # JSON Schema's integer takes 3.0 but not true; pydantic's lax int takes both.
        if isinstance(value, bool):
            raise ValueError("must be an integer, not a boolean")
        return value


def _controller(request: web.Request) -> RolloutController:
    return request.app[SERVICES].rollout


def _event(e: RolloutEvent) -> EventView:
    return EventView(at=e.at, kind=e.kind, region=e.region, version=e.version,
                     detail=dict(e.detail), replica=e.replica)


def _events(events: list[RolloutEvent]) -> list[EventView]:
    return [_event(e) for e in events]


async def rollout_view(controller: RolloutController, fleet: Fleet, *,
                       last: int = 50) -> RolloutView:
    """The rollout picture (also what ``pinproxy status`` and /admin/ui show).

    The state is this replica's last adopted copy of the shared one; the events are the
    fleet's, read from the shared store, or this replica's own while it is away (marked
    by ``events_complete``), so the picture still answers during a store outage."""
    try:
        events = await controller.fleet_events(last)
        error = None
    except RolloutUnavailable as exc:
        events = controller.events()[-last:] if last else []
        error = exc.code
    snapshot = fleet.registry.snapshot
    state = controller.state
    policy = controller.policy
    regions: list[RegionView] = []
    for region in sorted({s.region for s in snapshot.backends} | set(state.regions)):
        replicas: dict[str, int] = {}
        for s in snapshot.backends:
            if s.region == region and s.routable and s.version_key:
                replicas[s.version_key] = replicas.get(s.version_key, 0) + 1
        rs = state.regions.get(region)
        if rs is None:
            continue
        regions.append(RegionView(
            region=region, mode=policy.mode_of(region), state=rs.phase, current=rs.current,
            since=rs.since, previous=rs.previous,
            soak_until=rs.since + policy.soak_s if rs.soaking else None,
            candidate=rs.candidate, held=rs.held, halted=rs.halted, replicas=replicas,
        ))
    return RolloutView(regions=regions, blocked=sorted(snapshot.blocked_versions),
                       rollbacks=dict(state.rollbacks), events=_events(events),
                       events_complete=error is None, events_error=error)


class EventsView(BaseModel):
    events: list[EventView] = Field(description="the latest rollout decisions of every "
                                    "replica, oldest first (at most rollout.events_kept)")


async def _events_route(request: web.Request) -> web.StreamResponse:
    limit = int_query(request, "limit", 100, lo=0, hi=100_000)
    # Raises RolloutUnavailable (503 rollout_events_unavailable) while the store is away:
    # a list of this replica's decisions alone would read as the fleet's.
    events = await _controller(request).fleet_events(limit)
    return reply(EventsView(events=_events(events)))


async def _rollout(request: web.Request) -> web.StreamResponse:
    return reply(await rollout_view(_controller(request), Fleet.of(request)))


def _region(request: web.Request) -> str:
    region = request.match_info["region"]
    if not _ID_RE.fullmatch(region):
        raise BadRequest(f"invalid region id {region!r}", code="invalid_region", param="region")
    return region


async def _force(request: web.Request) -> web.StreamResponse:
    fleet = Fleet.of(request)
    region = _region(request)
    ref = version_ref(request.match_info["version"], fleet.registry.dimensions)
    snapshot = fleet.registry.snapshot
    if region not in {s.region for s in snapshot.backends}:
        raise NotFound(f"no backend is in region {region!r}", code="unknown_region",
                       param="region")
    keys = sorted({s.version_key for s in snapshot.backends
                   if s.region == region and s.version_key and matches(ref, s.version_key)})
    if not keys:
        raise NotFound(f"no backend in region {region!r} reports {ref!r}",
                       code="version_not_in_region", param="version")
    event = await _controller(request).force(region, keys[0])
    return reply(_event(event))


async def _roll_back(request: web.Request) -> web.StreamResponse:
    fleet = Fleet.of(request)
    dims = fleet.registry.dimensions
    bad = version_ref(request.match_info["version"], dims)
    to = version_ref(request.match_info["target"], dims, param="target")
    return await _rollback_answer(request, fleet, bad, to)


async def _rollback_body(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, RollbackBody)
    fleet = Fleet.of(request)
    dims = fleet.registry.dimensions
    bad = version_ref(body.bad, dims, param="from")
    to = version_ref(body.to, dims, param="to")
    return await _rollback_answer(request, fleet, bad, to)


async def _rollback_answer(request: web.Request, fleet: Fleet, bad: str,
                           to: str) -> web.StreamResponse:
    """Block ``bad``, return its regions to ``to``, repin lazily, list what still runs it."""
    if not any(matches(to, k) for k in fleet.registry.snapshot.serving_keys()):
        raise Conflict(f"no healthy backend serves {to!r}: nothing to roll back to",
                       code="target_not_serving", param="target")
    controller = _controller(request)
    # A rollback to itself changes nothing (and blocks nothing): it only lists.
    events = [] if bad == to else await controller.rollback(bad, to)
    snapshot = fleet.registry.snapshot
    state = controller.state
    targets: list[RollbackTarget] = []
    for s in snapshot.backends:
        if not s.version_key or not matches(bad, s.version_key):
            continue
        rs = state.regions.get(s.region)
        intended = None if s.intended is None else fleet.registry.version_key(s.intended)
        targets.append(RollbackTarget(
            id=s.id, region=s.region, runtime=s.version_key,
            intended=intended if intended != s.version_key else None,
            target=rs.current if rs is not None and not matches(bad, rs.current) else to,
        ))
    already = sorted(
        region for region in {s.region for s in snapshot.backends}
        if all(s.version_key and matches(to, s.version_key)
               for s in snapshot.backends if s.region == region and s.routable)
        and any(s.routable for s in snapshot.backends if s.region == region)
    )
    return reply(RollbackResult(version=bad, to=to, events=_events(events), backends=targets,
                                already_there=already, rollbacks=dict(state.rollbacks)))


async def _evals(request: web.Request) -> web.StreamResponse:
    fleet = Fleet.of(request)
    region = _region(request)
    ref = version_ref(request.match_info["version"], fleet.registry.dimensions)
    body = await read_body(request, EvalsBody)
    snapshot = fleet.registry.snapshot
    keys = sorted({s.version_key for s in snapshot.backends
                   if s.version_key and matches(ref, s.version_key)}) or [ref]
    _controller(request).push_evals(region, keys[0], body.passed, body.failed)
    return reply(EvalsAccepted(region=region, version=keys[0], passed=body.passed,
                               failed=body.failed), status=202)


class EvalsAccepted(BaseModel):
    region: str
    version: str
    passed: int
    failed: int


ROUTES: tuple[Route, ...] = (
    Route("GET", "/admin/rollout", _rollout,
          "The rollout picture: each region's current version and state (steady, mixed, "
          "soaking, halted), replicas per version, held-back candidates, recent decisions.",
          RolloutView, tags=_TAGS),
    Route("GET", "/admin/events", _events_route,
          "Rollout decisions with their evidence (flipped, held_back, soak_passed, "
          "regression, rolled_back, forced, initialised), oldest first.",
          EventsView, tags=_TAGS,
          errors=((503, "the shared store cannot be read: rollout_events_unavailable"),),
          query=(integer_param("limit", "how many of the latest (default 100)", lo=0,
                               hi=100_000),)),
    Route("PUT", "/admin/rollout/regions/{region}/current/{version}", _force,
          "Force a region's current version for new sessions now (no settle, no gates).",
          EventView, tags=_TAGS, path_params=(REGION, VERSION),
          errors=((404, "no backend in that region, or none of them reports the version"),)),
    Route("POST", "/admin/versions/{version}/roll-back-to/{target}", _roll_back,
          "Coordinated rollback: block the version for new sessions, return every region "
          "running it to the target (each region's own previous bundle where it matches), "
          "repin its sessions on their next request, and list the backends whose runtime "
          "still reports it.",
          RollbackResult, tags=_TAGS, path_params=(VERSION, TARGET),
          errors=((409, "no healthy backend serves the target"),)),
    Route("POST", "/admin/rollback", _rollback_body,
          'Coordinated rollback as one body, {"from", "to"}: the same as POST '
          "/admin/versions/{from}/roll-back-to/{to}.",
          RollbackResult, RollbackBody, tags=_TAGS,
          errors=((400, "a version names a dimension outside versions.dimensions"),
                  (409, "no healthy backend serves the target"))),
    Route("POST", "/admin/versions/{version}/evals/{region}", _evals,
          "Eval results for a version in a region: the soak's evals signal.",
          EvalsAccepted, EvalsBody, status=202, tags=_TAGS, path_params=(VERSION, REGION)),
)  # fmt: skip
