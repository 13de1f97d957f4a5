"""``MetricsObserver``: each finished request's counter and histogram updates.

One ``_Series`` per (version key, region, backend, status class) holds the children that
combination writes to, each bound (``labels()``) once; a request then costs a dict
look-up and the updates themselves. The metrics are defined in metrics.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from proxy.core.models import prompt_of
from proxy.telemetry.metrics import MAX_CACHED_SERIES

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

    from proxy.core.events import RequestEvent
    from proxy.telemetry.metrics import ProxyMetrics

_STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")


class _Series:
    """The children one label combination writes to, each bound (``labels()``) once.

    Token, time-to-first-byte and structured-output children are bound on first use,
    so a label combination that never sees them (e.g. 503s) exports no empty series.
    """

    __slots__ = (
        "_metrics",
        "completion",
        "duration",
        "prompt",
        "prompt_version",
        "region",
        "requests",
        "so_errors",
        "so_total",
        "ttfb",
    )

    def __init__(
        self, metrics: ProxyMetrics, version_key: str, region: str, backend: str, status: str
    ) -> None:
        self._metrics = metrics
        self.prompt_version = prompt = prompt_of(version_key)  # "" (no version) stays ""
        self.region = region
        self.requests = metrics.requests.labels(prompt, version_key, region, backend, status)
        self.duration = metrics.request_duration.labels(prompt, region)
        self.ttfb: Histogram | None = None
        self.prompt: Counter | None = None
        self.completion: Counter | None = None
        self.so_total: Counter | None = None
        self.so_errors: Counter | None = None

    def bind_ttfb(self) -> Histogram:
        self.ttfb = self._metrics.ttfb.labels(self.prompt_version, self.region)
        return self.ttfb

    def bind_tokens(self) -> tuple[Counter, Counter]:
        tokens = self._metrics.tokens
        self.prompt = tokens.labels(self.prompt_version, self.region, "prompt")
        self.completion = tokens.labels(self.prompt_version, self.region, "completion")
        return self.prompt, self.completion

    def bind_structured(self) -> tuple[Counter, Counter]:
        # Both at once: an error rate needs its zero-error series too.
        metrics = self._metrics
        self.so_total = metrics.structured_outputs.labels(self.prompt_version, self.region)
        self.so_errors = metrics.structured_output_errors.labels(self.prompt_version,
                                                                 self.region)
        return self.so_total, self.so_errors


class MetricsObserver:
    """Turns each finished request into counter and histogram updates (in memory only)."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics
        self._series: dict[tuple[str, str, str, int], _Series] = {}

    def observe(self, event: RequestEvent) -> None:
        # Unknown values ("no backend answered") are empty labels, which PromQL treats
        # like an absent label.
        key = (event.version_key or "", event.region or "", event.backend_id or "",
               event.status // 100)
        series = self._series.get(key)
        if series is None:
            series = self._new_series(key)
        series.requests.inc()
        if event.eval_run and event.version_key is not None and event.backend_id is not None:
            self._metrics.eval_requests_for(
                series.prompt_version, event.version_key, event.region or ""
            ).inc()
        series.duration.observe(event.duration_s)
        if event.ttfb_s is not None:
            (series.ttfb or series.bind_ttfb()).observe(event.ttfb_s)
        usage = event.usage
        if usage is not None:
            prompt, completion = (
                (series.prompt, series.completion)
                if series.prompt is not None and series.completion is not None
                else series.bind_tokens()
            )
            prompt.inc(usage.prompt_tokens)
            completion.inc(usage.completion_tokens)
        valid = event.structured_output_valid
        if valid is not None:
            total, errors = (
                (series.so_total, series.so_errors)
                if series.so_total is not None and series.so_errors is not None
                else series.bind_structured()
            )
            total.inc()
            if not valid:
                errors.inc()

    def _new_series(self, key: tuple[str, str, str, int]) -> _Series:
        if len(self._series) >= MAX_CACHED_SERIES:
            self._series.clear()
        version_key, region, backend, status_hundreds = key
        status = _STATUS_CLASSES[status_hundreds - 1] if 1 <= status_hundreds <= 5 else "other"
        series = _Series(self._metrics, version_key, region, backend, status)
        self._series[key] = series
        return series

    def __repr__(self) -> str:
        return f"MetricsObserver(series={len(self._series)})"
