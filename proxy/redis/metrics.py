"""What every Redis call costs and how it fails, emitted by the one call helper.

``RedisCall`` (proxy/redis/call.py) times each call into
``pinproxy_redis_call_duration_seconds{component, operation}`` and counts each failure
into ``pinproxy_redis_call_errors_total{component, operation, kind}``; so every Redis call
pinproxy makes is measured in one place, whichever component made it. Labels are
bounded: ``component`` is one of the few components that speak to Redis (store, audit,
traffic, control, rollout), ``operation`` the name the component gives its call (a
literal in its code: "get", "pin", "touch"...), ``kind`` one of ``ERROR_KINDS``.

Children are bound once per (component, operation) when a component declares its
operations (prometheus-client's ``labels()`` costs more than an observation), so they
are also exported at 0 from the start and an alert can see the first error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal

from prometheus_client import Counter, Histogram
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

ErrorKind = Literal["timeout", "connection", "response", "other"]
ERROR_KINDS: Final[tuple[ErrorKind, ...]] = ("timeout", "connection", "response", "other")

# A local round trip takes ~100 µs; a slow Redis, a failover or the op timeout, seconds.
BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5)


def error_kind(exc: BaseException, timed_out: bool) -> ErrorKind:
    """The failure's kind: no answer in time, no connection, or an error reply."""
    if timed_out or isinstance(exc, TimeoutError | RedisTimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | ConnectionError):
        return "connection"
    if isinstance(exc, ResponseError):
        return "response"  # Redis answered with an error (READONLY, WRONGTYPE, OOM...)
    return "other"


class BoundCall:
    """One (component, operation)'s children: the histogram and a counter per kind."""

    __slots__ = ("errors", "observe")

    def __init__(self, duration: Histogram, errors: dict[ErrorKind, Counter]) -> None:
        self.observe = duration.observe  # bound method: one attribute look-up less per call
        self.errors = errors


class RedisMetrics:
    """The Redis call metrics, registered on ``registry`` (never the global one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._duration = Histogram(
            "pinproxy_redis_call_duration_seconds",
            "Redis calls by component and operation, from sending to the answer (one "
            "round trip; a pipeline or script counts once).",
            ["component", "operation"],
            buckets=BUCKETS,
            registry=registry,
        )
        self._errors = Counter(
            "pinproxy_redis_call_errors",
            "Failed Redis calls by component, operation and kind (timeout, connection, "
            "response: an error reply, other).",
            ["component", "operation", "kind"],
            registry=registry,
        )
        self._bound: dict[tuple[str, str], BoundCall] = {}

    def bind(self, component: str, operation: str) -> BoundCall:
        """The children of one (component, operation), created at 0 on first use."""
        key = (component, operation)
        bound = self._bound.get(key)
        if bound is None:
            bound = BoundCall(
                self._duration.labels(component, operation),
                {kind: self._errors.labels(component, operation, kind) for kind in ERROR_KINDS},
            )
            self._bound[key] = bound
        return bound

    def __repr__(self) -> str:
        return f"RedisMetrics(bound={len(self._bound)})"
