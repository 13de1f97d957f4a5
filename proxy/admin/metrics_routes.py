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
    fleet.pinned = await _pinned_counts(services, fleet.known_versions(),
                                        settings.store.op_timeout_ms / 1000)
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
