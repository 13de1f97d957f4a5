"""Prometheus metrics, on an injected registry (never prometheus-client's global one).

Three kinds of metric live here:
* counters the data plane increments where a decision is made (pins, switches,
  mismatch guard, 503s, retries, pin-store timing, health transitions, audit drops);
* per-request counters and histograms filled by ``MetricsObserver``
  (request_metrics.py) from each ``RequestEvent`` (requests, latency, tokens,
  structured-output errors);
* gauges computed from the fleet's state at scrape time (``FleetCollector``).

Labels are bounded: version keys, prompt versions, regions, backend ids, status
classes and fixed reasons; never session ids, paths or other unbounded values.
A child counted on the request path is bound (``labels()``) once per label values and
kept (``Children``): ``labels()`` costs three times the increment itself.

With several worker processes, prometheus-client's multiprocess mode keeps the
counters and histograms in per-process files under ``PROMETHEUS_MULTIPROC_DIR``
(set by the supervisor before the workers start) and ``exposition`` sums them,
while the fleet gauges come from the scraping worker alone (see fleet_metrics.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from proxy.config.observability import MetricsConfig
from proxy.core.errors import StoreUnavailable
from proxy.redis.metrics import RedisMetrics

if TYPE_CHECKING:
    from types import TracebackType

    from prometheus_client.registry import Collector

# Pin-store operations: a cached pin costs microseconds, a Redis round trip milliseconds.
STORE_BUCKETS: Final = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                        0.5, 1.0)

GC_BUCKETS: Final = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# Label combinations are bounded by design; the cache bound is a backstop only.
MAX_CACHED_SERIES: Final = 10_000


class Children:
    """One metric's children, each bound (``labels()``) on first use and kept.

    prometheus-client never drops a child it made (pinproxy removes no series), so a
    kept child is the one ``labels()`` would return again.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Counter) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Counter] = {}

    def __call__(self, *labels: str) -> Counter:
        child = self._children.get(labels)
        if child is None:
            if len(self._children) >= MAX_CACHED_SERIES:
                self._children.clear()
            child = self._children[labels] = self._metric.labels(*labels)
        return child

    def __repr__(self) -> str:
        return f"Children({self._metric!r}, bound={len(self._children)})"


class ProxyMetrics:
    """Every pinproxy metric, registered on ``registry``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        config: MetricsConfig | None = None,
        *,
        multiprocess_dir: str | None = None,
    ) -> None:
        # Request latency buckets come from the config (LLM answers take from tens of
        # milliseconds to minutes; time to first byte is the model's queue and prefill).
        config = config or MetricsConfig()
        self.registry = registry
        self._multiprocess_dir = multiprocess_dir
        self._scrape_time: list[Collector] = []
        self._store_children: dict[str, tuple[Histogram, Counter]] = {}
        # Every Redis call, measured by the one call helper (proxy/redis/call.py).
        self.redis = RedisMetrics(registry)
        # process_* (CPU, memory, open fds, start time: what alert rules tell a young
        # target by) and python_info, of the process that answers the scrape.
        self._process: tuple[Collector, ...] = (
            ProcessCollector(registry=None), PlatformCollector(registry=None))
        if multiprocess_dir is None:
            for collector in self._process:
                registry.register(collector)
        self.pins_created = Counter(
            "pinproxy_pins_created",
            "Sessions pinned to a version for the first time.",
            ["version_key"],
            registry=registry,
        )
        self.pin_races_lost = Counter(
            "pinproxy_pin_races_lost",
            "New-session pins that found another replica's pin already in place.",
            registry=registry,
        )
        self.version_switches = Counter(
            "pinproxy_session_version_switches",
            "Sessions moved to another version, by reason (retired, admin_repin, pin_lost, "
            "pin_conflict).",
            ["reason", "from_version", "to_version"],
            registry=registry,
        )
        self.pin_conflicts = Counter(
            "pinproxy_pin_conflicts",
            "Pins re-asserted after the store lost data that found another pin in place "
            "(the stored pin won; the session's next answer is marked), per replica.",
            ["from_version", "to_version"],
            registry=registry,
        )
        self.lost_pins = Counter(
            "pinproxy_lost_pins",
            "Continuing conversations that found no pin, by what was done (mark: pinned "
            "afresh and marked; refuse: 503 pin_lost).",
            ["action"],
            registry=registry,
        )
        self.pin_tokens = Counter(
            "pinproxy_pin_tokens",
            "Pin tokens presented, by verdict (valid, malformed, unknown_key, forged, "
            "other_session, expired; only valid ones are honoured), and issued.",
            ["result"],
            registry=registry,
        )
        self.mismatch_guard = Counter(
            "pinproxy_mismatch_guard_triggers",
            "Responses withheld because their version stamp disagreed with the session's pin.",
            ["backend", "pinned_version", "stamped_version"],
            registry=registry,
        )
        self.unavailable = Counter(
            "pinproxy_version_unavailable_responses",
            "503 answers because no healthy backend served the pinned version.",
            ["version_key"],
            registry=registry,
        )
        self.upstream_retries = Counter(
            "pinproxy_upstream_retries",
            "Requests sent again to a backend of the same version, by reason: connect "
            "(nothing was written), dropped (an idempotent request replayed), "
            "version_mismatch, refused.",
            ["reason"],
            registry=registry,
        )
        self.refusals = Counter(
            "pinproxy_upstream_refusals",
            "Answers with routing.refusal_status to a pinned request: withheld, never relayed.",
            ["backend", "pinned_version"],
            registry=registry,
        )
        self.outlier_ejections = Counter(
            "pinproxy_outlier_ejections",
            "Backends taken out of routing by outlier detection or passive health.",
            ["backend", "region"],
            registry=registry,
        )
        self.audit_dropped = Counter(
            "pinproxy_audit_dropped",
            "Audit records lost: queue_full (dropped, never waited for) or write_failed.",
            ["reason"],
            registry=registry,
        )
        self.gc_pause = Histogram(
            "pinproxy_gc_pause_seconds",
            "Python garbage collections, by generation: each one stalls every request in flight.",
            ["generation"],
            buckets=GC_BUCKETS,
            registry=registry,
        )
        self.overloaded = Counter(
            "pinproxy_overloaded_responses",
            "Requests refused with 503 proxy_overloaded: a pin-store call timed out while "
            "the event loop itself ran late (this process was saturated, not the store).",
            registry=registry,
        )
        self.shed = Counter(
            "pinproxy_shed_requests",
            "Requests answered 503 proxy_overloaded for this process's own overload, by "
            "reason: shed by admission control before the handler ran (queue_full, "
            "queue_timeout, loop_lag), or a pin-store call that timed out while the event "
            "loop ran late (store_timeout).",
            ["reason"],
            registry=registry,
        )
        self.loop_lag = Histogram(
            "pinproxy_event_loop_lag_seconds",
            "How late a 50 ms timer ran: every request in flight waited as long for the loop.",
            buckets=GC_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "pinproxy_requests",
            "Proxied requests by the version that answered (or the pinned one, on a 503).",
            ["prompt_version", "version_key", "region", "backend", "status_class"],
            registry=registry,
        )
        self.eval_requests = Counter(
            "pinproxy_eval_requests",
            "Requests marked as eval traffic (evals.header) that a backend answered, by "
            "version and region; also in pinproxy_requests_total, never in the soak judge.",
            ["prompt_version", "version_key", "region"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "pinproxy_request_duration_seconds",
            "Time from a request's arrival until its last byte was sent.",
            ["prompt_version", "region"],
            buckets=config.duration_buckets,
            registry=registry,
        )
        self.ttfb = Histogram(
            "pinproxy_time_to_first_byte_seconds",
            "Upstream time to the response head, of requests a backend answered.",
            ["prompt_version", "region"],
            buckets=config.ttfb_buckets,
            registry=registry,
        )
        self.tokens = Counter(
            "pinproxy_tokens",
            "Tokens from the OpenAI usage object of answers, by kind (prompt, completion).",
            ["prompt_version", "region", "kind"],
            registry=registry,
        )
        self.structured_outputs = Counter(
            "pinproxy_structured_output_requests",
            "Answers to requests that asked for JSON output (response_format or text.format).",
            ["prompt_version", "region"],
            registry=registry,
        )
        self.structured_output_errors = Counter(
            "pinproxy_structured_output_errors",
            "Answers to JSON-output requests whose message content does not parse as JSON.",
            ["prompt_version", "region"],
            registry=registry,
        )
        self.health_transitions = Counter(
            "pinproxy_backend_health_transitions",
            "Backends turning healthy or unhealthy (each worker judges health on its own).",
            ["backend", "region", "to"],
            registry=registry,
        )
        self.client_connections_refused = Counter(
            "pinproxy_client_connections_refused",
            "Client connections answered 503 and closed at once, over a connection cap "
            "(reason: max_connections, max_connections_per_ip), by listener (data, admin).",
            ["listener", "reason"],
            registry=registry,
        )
        self.client_timeouts = Counter(
            "pinproxy_client_timeouts",
            "Client connections closed because a request head did not arrive in time "
            "(phase: request_head), by listener.",
            ["listener", "phase"],
            registry=registry,
        )
        self.bad_http_requests = Counter(
            "pinproxy_bad_http_requests",
            "Requests that were not valid HTTP/1.1 or over a size limit (answered 400, 413 "
            "or 431 and closed), by listener and reason (method, request_line, target, "
            "header, head_too_large, body_too_large, content_length, body_framing, other).",
            ["listener", "reason"],
            registry=registry,
        )
        self.store_duration = Histogram(
            "pinproxy_pin_store_duration_seconds",
            "Pin-store operations on the request path, cache hits included.",
            ["operation"],
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "pinproxy_pin_store_errors",
            "Pin-store operations on the request path that failed (the request got a 503).",
            ["operation"],
            registry=registry,
        )
        # The counters the request path labels per request, bound once per label values.
        self.pins_created_for = Children(self.pins_created)
        self.pin_tokens_for = Children(self.pin_tokens)
        self.eval_requests_for = Children(self.eval_requests)

    @property
    def multiprocess(self) -> bool:
        return self._multiprocess_dir is not None

    def add_scrape_time(self, collector: Collector) -> None:
        """Serve ``collector``'s metrics too; they are computed when scraped, never summed."""
        self._scrape_time.append(collector)
        self.registry.register(collector)

    def health_changed(self, backend_id: str, region: str, healthy: bool) -> None:
        """Registry hook: the backend's health just flipped."""
        self.health_transitions.labels(
            backend_id, region, "healthy" if healthy else "unhealthy"
        ).inc()

    def gc_paused(self, generation: str, seconds: float) -> None:
        """``GcPauses`` hook: one garbage collection took ``seconds``."""
        self.gc_pause.labels(generation).observe(seconds)

    def time_store(self, operation: str) -> StoreTimer:
        """``with metrics.time_store("get"): await store.get(...)``: times and counts failures."""
        children = self._store_children.get(operation)
        if children is None:
            # Bound once per operation: labels() costs more than the observation itself.
            children = (self.store_duration.labels(operation),
                        self.store_errors.labels(operation))
            self._store_children[operation] = children
        return StoreTimer(operation, *children)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The body and content type of a scrape (text format, or OpenMetrics if accepted)."""
        encoder, content_type = choose_encoder(accept)
        if self._multiprocess_dir is None:
            return encoder(self.registry), content_type
        # Each worker's counters are in its own file; the sum over them is the truth.
        # The fleet gauges are this worker's view only (every worker sees the same fleet).
        merged = CollectorRegistry()
        MultiProcessCollector(merged, self._multiprocess_dir)  # type: ignore[no-untyped-call]
        for collector in (*self._scrape_time, *self._process):
            merged.register(collector)
        return encoder(merged), content_type

    def __repr__(self) -> str:
        mode = f"multiprocess={self._multiprocess_dir!r}" if self.multiprocess else "single"
        return f"ProxyMetrics({mode}, registry={self.registry!r})"


class StoreTimer:
    """Times one pin-store call; a ``StoreUnavailable`` from it counts as an error."""

    __slots__ = ("_duration", "_errors", "_operation", "_started")

    def __init__(self, operation: str, duration: Histogram, errors: Counter) -> None:
        self._operation = operation
        self._duration = duration
        self._errors = errors
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._duration.observe(time.perf_counter() - self._started)
        if exc_type is not None and issubclass(exc_type, StoreUnavailable):
            self._errors.inc()

    def __repr__(self) -> str:
        return f"StoreTimer({self._operation!r})"
