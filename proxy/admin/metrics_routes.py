"""``GET /metrics``: Prometheus exposition on the admin listener.

Like every admin route it needs the admin token, unless ``"/metrics"`` is in
``admin.public_paths`` (the usual set-up for a scraper). With several workers any
worker may answer; each answers with the sum over all of them (see metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.admin.api import Route, install
from proxy.admin.app import SERVICES
from proxy.core.errors import NotFound, StoreUnavailable
from proxy.store.draining import Draining, draining
from proxy.telemetry.eval_coverage import Coverage, coverage
from proxy.telemetry.traffic import TrafficUnavailable

if TYPE_CHECKING:
    from collections.abc import Mapping

    from proxy.app.services import Services

logger = logging.getLogger(__name__)


async def _metrics(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    settings = services.settings
    if not settings.metrics.enabled:
        raise NotFound("metrics are disabled (metrics.enabled = false)")
    fleet = services.fleet_metrics
    versions = fleet.known_versions()
    timeout_s = settings.store.op_timeout_ms / 1000
    fleet.pinned = await _pinned_counts(services, versions, timeout_s)
    fleet.draining = await _draining(services, versions, timeout_s)
    fleet.coverage = await _coverage(services, timeout_s)
    body, content_type = services.metrics.exposition(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _pinned_counts(
    services: Services, versions: list[str], timeout_s: float
) -> Mapping[str, int] | None:
    """Sessions pinned per version, or None when the store cannot say (the gauge is left out).

    Fetched here, before rendering, because a collector cannot await the store.
    """
    store = services.store
    if not versions:
        return None
    try:
        async with asyncio.timeout(timeout_s):
            counts = await asyncio.gather(*(store.count_pinned(key) for key in versions))
    except (StoreUnavailable, TimeoutError) as exc:
        logger.debug("metrics: pinned-session counts unavailable: %s", exc)
        return None
    return dict(zip(versions, counts, strict=True))


async def _draining(
    services: Services, versions: list[str], timeout_s: float
) -> Mapping[str, Draining] | None:
    """Active sessions and last expiry per version, or None when the store cannot say."""
    if not versions:
        return None
    settings = services.settings
    try:
        async with asyncio.timeout(timeout_s):
            return await draining(services.store, versions,
                                  window_s=settings.versions.active_window_s,
                                  pin_ttl_s=settings.store.pin_ttl_s)
    except (StoreUnavailable, TimeoutError) as exc:
        logger.debug("metrics: session activity unavailable: %s", exc)
        return None


async def _coverage(services: Services, timeout_s: float) -> list[Coverage] | None:
    """Eval coverage over ``evals.window_s``, or None when the counts cannot be read."""
    config = services.live_settings.evals
    try:
        async with asyncio.timeout(timeout_s):
            production = await services.traffic.window(config.window_s)
            evals = await services.eval_traffic.window(config.window_s)
    except (TrafficUnavailable, TimeoutError) as exc:
        logger.debug("metrics: eval coverage unavailable: %s", exc)
        return None
    return coverage(production, evals, config.min_production_share)


ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/metrics",
        _metrics,
        "Prometheus metrics: requests, latency, tokens and structured-output errors by "
        "prompt version and region; versions serving; pins, switches, guard triggers.",
        tags=("observability",),
        # The text format, or OpenMetrics when the scraper's Accept asks for it.
        media_types=("text/plain", "application/openmetrics-text"),
    ),
)


def install_metrics_only(app: web.Application) -> None:
    """The separate metrics listener's one route (``metrics.port``)."""
    install(app, ROUTES)
