"""The data plane's reloadable policies, built from the settings as one immutable object.

A config reload (proxy/app/reload.py) builds a new ``LivePolicies`` and the data plane
swaps it in with one assignment. Each request reads it once, when it arrives, and
decides by that object to its end: a request in flight during a reload finishes
under the policies it started with, and no request ever sees half of the old
settings and half of the new. The fields here are exactly the data-plane settings
``proxy.config.reload.LIVE`` names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.dataplane.lost_pin import LostPinPolicy
from proxy.dataplane.request_body import SessionBodyReader
from proxy.policy.lifecycle import LifecyclePolicy
from proxy.policy.routing import RoutingPolicy

if TYPE_CHECKING:
    from proxy.config.settings import Settings
    from proxy.telemetry.metrics import ProxyMetrics


@dataclass(frozen=True, slots=True)
class LivePolicies:
    """What one request is decided by (see the module docstring)."""

    pinning: bool
    retry_after_s: int
    routing: RoutingPolicy
    lifecycle: LifecyclePolicy
    body_reader: SessionBodyReader
    lost_pin: LostPinPolicy
    retry_budget_percent: float
    min_retry_concurrency: int
    eval_header: str | None  # evals.header: marks eval traffic (None: none is marked)

    @classmethod
    def from_settings(cls, settings: Settings, metrics: ProxyMetrics) -> LivePolicies:
        routing = settings.routing
        policy = RoutingPolicy.from_config(routing, settings.versions)
        return cls(
            pinning=routing.pinning,
            retry_after_s=routing.retry_after_s,
            routing=policy,
            lifecycle=LifecyclePolicy(
                routing=policy,
                pin_wait_s=routing.pin_wait_ms / 1000.0,
                retry_after_s=routing.retry_after_s,
                refusal_status=routing.refusal_status or None,
                max_attempts=routing.max_attempts,
            ),
            body_reader=SessionBodyReader(
                settings.sessions,
                settings.upstream.max_buffered_body_bytes,
                settings.listen.max_request_body_bytes,
            ),
            lost_pin=LostPinPolicy(settings.sessions, metrics, routing.retry_after_s),
            retry_budget_percent=routing.retry_budget_percent,
            min_retry_concurrency=routing.min_retry_concurrency,
            eval_header=settings.evals.header,
        )
