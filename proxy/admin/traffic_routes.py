"""``GET /admin/traffic``: the production version distribution an eval harness compares
itself against, the eval traffic's beside it, and where evals miss what users get
(proxy/eval_coverage.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from proxy.admin.api import Route, int_query, integer_param, reply
from proxy.admin.app import SERVICES
from proxy.admin.fleet_common import Fleet
from proxy.admin.versions import LONG_WINDOW_S, Share, shares
from proxy.telemetry.eval_coverage import coverage

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.telemetry.traffic import Window

MIN_WINDOW_S, MAX_WINDOW_S = 60, 86_400


class RegionTraffic(BaseModel):
    requests: int
    versions: dict[str, Share]


class Distribution(BaseModel):
    requests: int
    regions: dict[str, RegionTraffic]
    versions: dict[str, Share] = Field(description="over every region")


class CoverageRow(BaseModel):
    region: str
    version_key: str
    production_requests: int
    production_share: float = Field(description="of the region's production requests")
    eval_requests: int
    uncovered: bool = Field(description="over evals.min_production_share with no eval "
                                        "request in the window")


class TrafficView(BaseModel):
    """Requests served per region and version over a window (every replica with Redis):
    production at the top level, eval traffic (``evals.header``) under ``evals``."""

    window_s: int
    since: float = Field(description="start of the window (wall clock; whole minutes)")
    until: float
    requests: int
    regions: dict[str, RegionTraffic]
    versions: dict[str, Share] = Field(description="over every region")
    evals: Distribution = Field(description="eval traffic over the same window")
    eval_header: str | None = Field(description="the header that marks eval traffic")
    min_production_share: float
    coverage: list[CoverageRow] = Field(
        description="per region and version: production share beside eval requests")


def _distribution(window: Window) -> Distribution:
    return Distribution(
        requests=window.total,
        regions={region: RegionTraffic(requests=sum(counts.values()), versions=shares(counts))
                 for region, counts in sorted(window.by_region().items())},
        versions=shares(window.by_version()),
    )


async def _traffic(request: web.Request) -> web.StreamResponse:
    fleet = Fleet.of(request)
    window_s = int_query(request, "window_s", LONG_WINDOW_S, lo=MIN_WINDOW_S, hi=MAX_WINDOW_S)
    production = await fleet.traffic.window(window_s)
    evals = await fleet.eval_traffic.window(window_s)
    config = request.app[SERVICES].live_settings.evals
    prod = _distribution(production)
    rows = coverage(production, evals, config.min_production_share)
    view = TrafficView(
        window_s=window_s, since=production.since, until=production.until,
        requests=prod.requests, regions=prod.regions, versions=prod.versions,
        evals=_distribution(evals), eval_header=config.header,
        min_production_share=config.min_production_share,
        coverage=[CoverageRow(region=c.region, version_key=c.version_key,
                              production_requests=c.production_requests,
                              production_share=c.production_share,
                              eval_requests=c.eval_requests, uncovered=c.uncovered)
                  for c in rows],
    )
    return reply(view)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/admin/traffic", _traffic,
          "Production version distribution: requests and share per region and version "
          "over the window (default 3600 s; whole minutes); the eval traffic's beside it, "
          "and per region and version whether evals exercised what users get.",
          TrafficView, tags=("traffic",),
          query=(integer_param("window_s", "window length in seconds (default 3600)",
                               lo=MIN_WINDOW_S, hi=MAX_WINDOW_S),)),
)  # fmt: skip
