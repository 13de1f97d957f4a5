"""Counters the data plane keeps, on an injected prometheus registry.

The version-change events the design promises to count live here now; the full
metric set (requests, latency, tokens by prompt_version) grows from this class.
Labels are version keys and backend ids only: never session ids or other
unbounded values.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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
            "Sessions moved to another version, by reason.",
            ["reason", "from_version", "to_version"],
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
            "Requests sent again to another backend of the same version, by reason.",
            ["reason"],
            registry=registry,
        )

    def __repr__(self) -> str:
        return f"ProxyMetrics(registry={self.registry!r})"
