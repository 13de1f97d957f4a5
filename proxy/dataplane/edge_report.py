"""What a listener's edge counts and logs: refusals, timeouts, malformed requests, bugs.

Both HTTP servers (listener.py's aiohttp one for admin, h1_server.py's for the data
port) report through one ``EdgeReport``, so their metrics and their rate-limited
warnings read the same.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from proxy.core.edge_limits import WarningLimiter

if TYPE_CHECKING:
    from proxy.telemetry.metrics import ProxyMetrics

logger = logging.getLogger("proxy.dataplane.listener")

# Anyone can send malformed requests: one warning per this long, however many come.
WARN_EVERY_S = 10.0


class EdgeReport:
    """One listener's counters and warnings (``name`` labels its metrics)."""

    __slots__ = ("_error_logs", "_malformed_warnings", "_metrics", "name")

    def __init__(self, name: str, metrics: ProxyMetrics) -> None:
        self.name = name
        self._metrics = metrics
        self._malformed_warnings = WarningLimiter(WARN_EVERY_S, time.monotonic)
        self._error_logs = WarningLimiter(WARN_EVERY_S, time.monotonic)

    def refused(self, reason: str) -> None:
        """A connection over a cap was refused."""
        self._metrics.client_connections_refused.labels(self.name, reason).inc()

    def timed_out(self, phase: str) -> None:
        """A client was too slow in ``phase`` (e.g. ``request_head``)."""
        self._metrics.client_timeouts.labels(self.name, phase).inc()

    def malformed(self, reason: str, peer: str | None) -> None:
        """Count a malformed request; warn, at most once per ``WARN_EVERY_S``."""
        self._metrics.bad_http_requests.labels(self.name, reason).inc()
        held = self._malformed_warnings.allow()
        if held is not None:
            logger.warning(
                "%s HTTP request on the %s port from %s (%s); answered 4xx and closed%s",
                "oversized" if reason == "body_too_large" else "malformed",
                self.name, peer or "?", reason,
                f"; {held} more since the last such warning" if held else "",
            )

    def unexpected(self, exc: BaseException | None) -> None:
        """A handler failed in a way nothing caught: log it, at most once per interval."""
        held = self._error_logs.allow()
        if held is not None:
            logger.error("unexpected error answering on the %s port (%d more since)",
                         self.name, held, exc_info=exc)

    def __repr__(self) -> str:
        return f"EdgeReport({self.name})"
