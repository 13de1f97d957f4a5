"""Admin routes for versions: the fleet view, the kill switch, the rollback query, and
the production version distribution an eval harness compares itself against.

Everything here answers from the runtime (invariant 2): a version "runs" on a backend
when that backend's runtime reports it, whatever anyone intended. Version references
in paths are a full key (``prompt=v47,parser=p2``, percent-encoded or not, any order)
or a bare prompt version (``v47``) that names every key with that prompt.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from proxy.admin.api import Route, int_query, integer_param, reply
from proxy.admin.app import SERVICES
from proxy.admin.fleet_common import VERSION, Fleet, matches, version_ref
from proxy.core.models import prompt_of

if TYPE_CHECKING:
    from collections.abc import Iterable

    from aiohttp import web

    from proxy.telemetry.traffic import Window

_TAGS = ("versions",)
SHORT_WINDOW_S = 300
LONG_WINDOW_S = 3600
MIN_WINDOW_S, MAX_WINDOW_S = 60, 86_400


class Share(BaseModel):
    requests: int
    share: float = Field(description="fraction of the requests in its scope (0..1)")


class VersionEntry(BaseModel):
    """One version key as the fleet runs it now."""

    version_key: str
    prompt: str
    backends: list[str] = Field(description="backends whose runtime reports this version")
    regions: list[str]
    healthy_backends: int
    serving: bool = Field(description="at least one healthy backend reports it")
    pinned_sessions: int = Field(description="live sessions pinned to it (may lag ~seconds)")
    admitted: bool = Field(description="new sessions may get it: config admits, not blocked")
    blocked: bool = Field(description="blocked for new sessions by an operator (kill switch)")
    intended_by: list[str] = Field(description="backends whose controller intends it")
    share_5m: dict[str, Share] = Field(description="per region: share of its requests, 5 min")
    share_1h: dict[str, Share] = Field(description="per region: share of its requests, 1 h")


class VersionsView(BaseModel):
    skew: bool = Field(description="more than one version is serving")
    serving: list[str]
    blocked: list[str] = Field(description="blocked version keys and bare prompts")
    versions: list[VersionEntry]


class AdmissionView(BaseModel):
    version: str = Field(description="the version key or bare prompt, as stored")
    blocked: bool
    blocked_versions: list[str]
    running_keys: list[str] = Field(description="version keys running now that it names")


class RollbackBackend(BaseModel):
    id: str
    region: str
    version_key: str
    healthy: bool
    draining: bool
    reported_at: float | None
    report_source: str | None


class RollbackView(BaseModel):
    """Where a version really runs: what a rollback has to touch."""

    version: str
    version_keys: list[str] = Field(description="the keys it names that runtimes report")
    backends: list[RollbackBackend] = Field(description="backends whose runtime reports it")
    regions: list[str]
    pinned_sessions: int
    intended_elsewhere: list[str] = Field(
        description="backends intended to run it whose runtime reports another version "
        "(nothing to roll back there)"
    )


class RegionTraffic(BaseModel):
    requests: int
    versions: dict[str, Share]


class TrafficView(BaseModel):
    """Requests served per region and version over a window (every replica with Redis)."""

    window_s: int
    since: float = Field(description="start of the window (wall clock; whole minutes)")
    until: float
    requests: int
    regions: dict[str, RegionTraffic]
    versions: dict[str, Share] = Field(description="over every region")


def _shares(counts: dict[str, int]) -> dict[str, Share]:
    total = sum(counts.values())
    return {
        key: Share(requests=n, share=n / total if total else 0.0)
        for key, n in sorted(counts.items())
    }


def _region_shares(window: Window, version_key: str) -> dict[str, Share]:
    out = {}
    for region, counts in sorted(window.by_region().items()):
        if version_key in counts:
            out[region] = _shares(counts)[version_key]
    return out


async def _pinned(fleet: Fleet, keys: Iterable[str]) -> dict[str, int]:
    keys = list(keys)
    counts = await asyncio.gather(*(fleet.store.count_pinned(k) for k in keys))
    return dict(zip(keys, counts, strict=True))


async def _list_versions(request: web.Request) -> web.StreamResponse:
    fleet = Fleet.of(request)
    snapshot = fleet.registry.snapshot
    policy = request.app[SERVICES].dataplane.routing_policy  # as reloaded
    short = await fleet.traffic.window(SHORT_WINDOW_S)
    long = await fleet.traffic.window(LONG_WINDOW_S)
    keys = sorted(set(snapshot.by_key) | set(long.by_version()))
    pinned = await _pinned(fleet, keys)
    serving = snapshot.serving_keys()
    entries = []
    for key in keys:
        states = snapshot.by_key.get(key, ())
        entries.append(
            VersionEntry(
                version_key=key,
                prompt=prompt_of(key),
                backends=[s.id for s in states],
                regions=sorted({s.region for s in states}),
                healthy_backends=sum(1 for s in states if s.healthy),
                serving=key in serving,
                pinned_sessions=pinned[key],
                admitted=policy.admits(key) and not snapshot.blocks(key),
                blocked=snapshot.blocks(key),
                intended_by=[
                    s.id
                    for s in snapshot.backends
                    if s.intended is not None and fleet.registry.version_key(s.intended) == key
                ],
                share_5m=_region_shares(short, key),
                share_1h=_region_shares(long, key),
            )
        )
    view = VersionsView(
        skew=len(serving) > 1,
        serving=sorted(serving),
        blocked=sorted(snapshot.blocked_versions),
        versions=entries,
    )
    return reply(view)


async def _admission(request: web.Request, blocked: bool) -> web.StreamResponse:
    fleet = Fleet.of(request)
    ref = version_ref(request.match_info["version"], fleet.registry.dimensions)
    await fleet.control.set_blocked(ref, blocked)
    snapshot = fleet.registry.snapshot
    view = AdmissionView(
        version=ref,
        blocked=ref in snapshot.blocked_versions,
        blocked_versions=sorted(snapshot.blocked_versions),
        running_keys=sorted(k for k in snapshot.by_key if matches(ref, k)),
    )
    return reply(view)


async def _block_version(request: web.Request) -> web.StreamResponse:
    return await _admission(request, True)


async def _admit_version(request: web.Request) -> web.StreamResponse:
    return await _admission(request, False)


async def _rollback(request: web.Request) -> web.StreamResponse:
    fleet = Fleet.of(request)
    registry = fleet.registry
    ref = version_ref(request.match_info["version"], registry.dimensions)
    snapshot = registry.snapshot
    running = [s for s in snapshot.backends if s.version_key and matches(ref, s.version_key)]
    running_ids = {s.id for s in running}
    # Sessions can stay pinned to a version no backend reports right now.
    known = set(snapshot.version_last_seen) | set(snapshot.by_key)
    counted = {k for k in known if matches(ref, k)} | ({ref} if "=" in ref else set())
    pinned = await _pinned(fleet, sorted(counted))
    view = RollbackView(
        version=ref,
        version_keys=sorted({s.version_key for s in running if s.version_key}),
        backends=[
            RollbackBackend(
                id=s.id,
                region=s.region,
                version_key=s.version_key or "",
                healthy=s.healthy,
                draining=s.draining,
                reported_at=s.reported_at,
                report_source=s.report_source,
            )
            for s in running
        ],
        regions=sorted({s.region for s in running}),
        pinned_sessions=sum(pinned.values()),
        intended_elsewhere=[
            s.id
            for s in snapshot.backends
            if s.intended is not None
            and matches(ref, registry.version_key(s.intended))
            and s.id not in running_ids
        ],
    )
    return reply(view)


async def _traffic(request: web.Request) -> web.StreamResponse:
    fleet = Fleet.of(request)
    window_s = int_query(request, "window_s", LONG_WINDOW_S, lo=MIN_WINDOW_S, hi=MAX_WINDOW_S)
    window = await fleet.traffic.window(window_s)
    regions = {
        region: RegionTraffic(requests=sum(counts.values()), versions=_shares(counts))
        for region, counts in sorted(window.by_region().items())
    }
    view = TrafficView(
        window_s=window_s,
        since=window.since,
        until=window.until,
        requests=window.total,
        regions=regions,
        versions=_shares(window.by_version()),
    )
    return reply(view)


_ONE = "/admin/versions/{version}"
_P = (VERSION,)
ROUTES: tuple[Route, ...] = (
    Route("GET", "/admin/versions", _list_versions,
          "The fleet by version: backends, regions, health, pinned sessions, request "
          "shares per region, admission; skew when more than one version serves.",
          VersionsView, tags=_TAGS),
    Route("POST", f"{_ONE}/block", _block_version,
          "Kill switch: no new sessions get this version (key or bare prompt); sessions "
          "already pinned to it are untouched.",
          AdmissionView, tags=_TAGS, path_params=_P),
    Route("DELETE", f"{_ONE}/block", _admit_version,
          "Admit the version for new sessions again.", AdmissionView, tags=_TAGS,
          path_params=_P),
    Route("GET", f"{_ONE}/rollback", _rollback,
          "Where the version really runs (by runtime report, not intent), and how many "
          "sessions are pinned to it.",
          RollbackView, tags=_TAGS, path_params=_P),
    Route("GET", "/admin/traffic", _traffic,
          "Production version distribution: requests and share per region and version "
          "over the window (default 3600 s; whole minutes).",
          TrafficView, tags=("traffic",),
          query=(integer_param("window_s", "window length in seconds (default 3600)",
                               lo=MIN_WINDOW_S, hi=MAX_WINDOW_S),)),
)  # fmt: skip
