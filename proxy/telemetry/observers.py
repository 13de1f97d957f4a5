"""The observers that report on every request: metrics, the request log, traces.

Built once by the composition root from the settings; each is a ``RequestObserver``
(in-memory work only per request). ``start`` and ``close`` run the background parts:
the request log's writer thread and the span exporter.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from proxy.telemetry.request_metrics import MetricsObserver
from proxy.telemetry.requestlog import RequestLog, SessionHasher

if TYPE_CHECKING:
    from proxy.config.settings import Settings
    from proxy.core.events import RequestObserver
    from proxy.telemetry.metrics import ProxyMetrics
    from proxy.telemetry.tracing import TracingObserver

logger = logging.getLogger(__name__)


class Telemetry:
    """Metrics, request log and tracing observers, as the settings ask for them."""

    def __init__(
        self, settings: Settings, metrics: ProxyMetrics, tracing: TracingObserver | None = None
    ) -> None:
        """``tracing``: a ready tracing observer (tests), instead of one from the settings."""
        hasher = SessionHasher.from_config(settings.log)
        observers: list[RequestObserver] = []
        if settings.metrics.enabled:
            observers.append(MetricsObserver(metrics))
        self.request_log: RequestLog | None = None
        if settings.log.request_log:
            self.request_log = RequestLog(hasher)
            observers.append(self.request_log)
        self.tracing: TracingObserver | None = tracing
        endpoint = None if tracing is not None else settings.tracing.endpoint(os.environ)
        if endpoint is not None:
            self.tracing = _build_tracing(settings, hasher, endpoint)
        if self.tracing is not None:
            observers.append(self.tracing)
        self.observers: tuple[RequestObserver, ...] = tuple(observers)

    def start(self) -> None:
        if self.request_log is not None:
            self.request_log.start()

    def close(self) -> None:
        """Write queued log lines and export buffered spans (after the data plane stopped)."""
        if self.request_log is not None:
            self.request_log.stop()
        if self.tracing is not None:
            self.tracing.close()

    def __repr__(self) -> str:
        return f"Telemetry(observers={self.observers!r})"


def _build_tracing(
    settings: Settings, hasher: SessionHasher, endpoint: str
) -> TracingObserver | None:
    # Deferred: OpenTelemetry is an optional extra, imported only when tracing is on.
    try:
        from proxy.telemetry.tracing import build_tracing

        tracing = build_tracing(settings.tracing, hasher)
    except ImportError:
        if settings.tracing.otlp_endpoint is not None:
            raise
        # Asked for by OTEL_* variables alone (often set for a whole pod): a warning,
        # not a proxy that will not start.
        logger.warning("tracing: OTEL_EXPORTER_OTLP_* is set but the 'otel' extra is not "
                       "installed (pip install 'pinproxy[otel]'); no spans")
        return None
    logger.info("tracing: OTLP spans to %s", endpoint)
    return tracing
