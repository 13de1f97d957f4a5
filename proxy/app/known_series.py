"""Counters exported at 0 from the start, for every label value known in advance.

A prometheus-client counter child exists only once it is first incremented, so a
series such as ``pinproxy_audit_dropped_total{reason="queue_full"}`` would appear with
the first drop: a dashboard panel stays empty ("no data", not 0) until then, and an
alert written as ``increase(...) > 0`` cannot see the first event, because a series
that is born at 1 has not increased. Creating each child at 0 when the proxy starts
fixes both, for every label whose values are a fixed vocabulary (reasons, operations,
listeners) or come from the config (the configured backends). Labels that name
versions are only known once they happen; the alert rules handle those series being
born (config/prometheus-alerts.yml).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, get_args

from proxy.core.admission import SHED_REASONS
from proxy.core.edge_limits import MALFORMED_DESCRIPTIONS
from proxy.dataplane.lost_pin import Action
from proxy.policy.lifecycle_messages import RetryReason
from proxy.policy.pin_token import Result

if TYPE_CHECKING:
    from collections.abc import Iterable

    from proxy.core.models import Backend
    from proxy.telemetry.metrics import ProxyMetrics

# The request path's pin-store operations (``ProxyMetrics.time_store``).
STORE_OPERATIONS: Final = ("get", "pin_if_absent", "repin")
AUDIT_DROP_REASONS: Final = ("queue_full", "write_failed")
LISTENERS: Final = ("data", "admin")
CONNECTION_REFUSALS: Final = ("max_connections", "max_connections_per_ip")
CLIENT_TIMEOUT_PHASES: Final = ("request_head",)


def export_known_series(
    metrics: ProxyMetrics, backends: Iterable[Backend] = (), *, metrics_listener: bool = False
) -> None:
    """Create every counter child whose labels are known now, at 0 (idempotent).

    ``metrics_listener``: the separate metrics listener runs too (``metrics.port``).
    """
    for reason in get_args(RetryReason):
        metrics.upstream_retries.labels(reason)
    for action in get_args(Action):
        if action != "new":  # "new" is an ordinary new session, never counted
            metrics.lost_pins.labels(action)
    for result in (*get_args(Result), "issued"):
        metrics.pin_tokens.labels(result)
    for reason in (*SHED_REASONS, "store_timeout"):
        metrics.shed.labels(reason)
    for reason in AUDIT_DROP_REASONS:
        metrics.audit_dropped.labels(reason)
    for operation in STORE_OPERATIONS:
        metrics.time_store(operation)  # binds the duration histogram and the error counter
    for listener in (*LISTENERS, *(("metrics",) if metrics_listener else ())):
        for reason in CONNECTION_REFUSALS:
            metrics.client_connections_refused.labels(listener, reason)
        for phase in CLIENT_TIMEOUT_PHASES:
            metrics.client_timeouts.labels(listener, phase)
        for reason in MALFORMED_DESCRIPTIONS:
            metrics.bad_http_requests.labels(listener, reason)
    export_backend_series(metrics, backends)


def export_backend_series(metrics: ProxyMetrics, backends: Iterable[Backend]) -> None:
    """The per-backend counters of ``backends`` at 0 (at start, and for reloaded ones)."""
    for backend in backends:
        metrics.outlier_ejections.labels(backend.id, backend.region)
        for to in ("healthy", "unhealthy"):
            metrics.health_transitions.labels(backend.id, backend.region, to)
