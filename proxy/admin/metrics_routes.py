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

from proxy.admin.api import Route
from proxy.admin.app import DATA_APP
from proxy.app.build import EVAL_TRAFFIC, FLEET_METRICS, METRICS, SETTINGS, STORE, TRAFFIC
from proxy.core.errors import NotFound, StoreUnavailable
from proxy.store.draining import Draining, draining
from proxy.telemetry.eval_coverage import Coverage, coverage
from proxy.telemetry.traffic import TrafficUnavailable

if TYPE_CHECKING:
    from collections.abc import Mapping

logger = logging.getLogger(__name__)


async def _metrics(request: web.Request) -> web.StreamResponse:
    data_app = request.app[DATA_APP]
    settings = data_app[SETTINGS]
    if not settings.metrics.enabled:
        raise NotFound("metrics are disabled (metrics.enabled = false)")
    fleet = data_app[FLEET_METRICS]
    versions = fleet.known_versions()
    timeout_s = settings.store.op_timeout_ms / 1000
    fleet.pinned = await _pinned_counts(data_app, versions, timeout_s)
    fleet.draining = await _draining(data_app, versions, timeout_s)
    fleet.coverage = await _coverage(data_app, timeout_s)
    body, content_type = data_app[METRICS].exposition(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _pinned_counts(
    data_app: web.Application, versions: list[str], timeout_s: float
) -> Mapping[str, int] | None:
    """Sessions pinned per version, or None when the store cannot say (the gauge is left out).

    Fetched here, before rendering, because a collector cannot await the store.
    """
    store = data_app.get(STORE)
    if store is None or not versions:
        return None
    try:
        async with asyncio.timeout(timeout_s):
            counts = await asyncio.gather(*(store.count_pinned(key) for key in versions))
    except (StoreUnavailable, TimeoutError) as exc:
        logger.debug("metrics: pinned-session counts unavailable: %s", exc)
        return None
    return dict(zip(versions, counts, strict=True))


async def _draining(
    data_app: web.Application, versions: list[str], timeout_s: float
) -> Mapping[str, Draining] | None:
    """Active sessions and last expiry per version, or None when the store cannot say."""
    store = data_app.get(STORE)
    if store is None or not versions:
        return None
    settings = data_app[SETTINGS]
    try:
        async with asyncio.timeout(timeout_s):
            return await draining(store, versions, window_s=settings.versions.active_window_s,
                                  pin_ttl_s=settings.store.pin_ttl_s)
    except (StoreUnavailable, TimeoutError) as exc:
        logger.debug("metrics: session activity unavailable: %s", exc)
        return None


async def _coverage(data_app: web.Application, timeout_s: float) -> list[Coverage] | None:
    """Eval coverage over ``evals.window_s``, or None when the counts cannot be read."""
    config = data_app[SETTINGS].evals
    try:
        async with asyncio.timeout(timeout_s):
            production = await data_app[TRAFFIC].window(config.window_s)
            evals = await data_app[EVAL_TRAFFIC].window(config.window_s)
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
