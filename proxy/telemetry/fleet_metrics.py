"""Gauges computed from the registry's snapshot when /metrics is scraped.

Nothing here is updated on the request path: each scrape reads the current
immutable ``Snapshot`` (and the pinned-session counts the /metrics handler fetched
just before) and turns it into gauges. With several workers these gauges come from
the one worker that answers the scrape, never summed over workers: every worker
watches the same fleet, so a sum would multiply "versions serving" by the worker
count.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from proxy.core.models import DIMENSIONS, prompt_of

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from prometheus_client import Metric

    from proxy.core.models import BackendState, VersionBundle
    from proxy.fleet.registry import Registry
    from proxy.store.draining import Draining
    from proxy.telemetry.eval_coverage import Coverage

_BUNDLE_LABELS = ("version_key", *DIMENSIONS)


class FleetCollector:
    """A prometheus collector over ``registry``'s current snapshot."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        # Sessions pinned per version key, as fetched by the latest scrape (None: the
        # store did not answer, or nobody asked): a collector cannot await the store.
        self.pinned: Mapping[str, int] | None = None
        # The same for session-aware draining (active sessions, last pin expiry).
        self.draining: Mapping[str, Draining] | None = None
        # Eval coverage per region and version over evals.window_s.
        self.coverage: Sequence[Coverage] | None = None

    def known_versions(self) -> list[str]:
        """Version keys worth a pinned-session count: reported since start or running now."""
        snapshot = self._registry.snapshot
        keys = set(snapshot.version_last_seen)
        keys.update(s.version_key for s in snapshot.backends if s.version_key is not None)
        return sorted(keys)

    def describe(self) -> Iterator[Metric]:
        # Names only, so a clash with another collector is caught at registration.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        snapshot = self._registry.snapshot
        serving, region_versions, version_backends, healthy, draining, runtime, intended, drift = (
            self._families()
        )
        regions: dict[str, set[str]] = {}
        per_version: Counter[tuple[str, str]] = Counter()
        for state in snapshot.backends:
            labels = [state.id, state.region]
            regions.setdefault(state.region, set())
            healthy.add_metric(labels, 1.0 if state.healthy else 0.0)
            draining.add_metric(labels, 1.0 if state.draining else 0.0)
            key = state.version_key
            if key is not None:
                # Backends that report a version but cannot take traffic show as 0.
                per_version[(key, state.region)] += 1 if state.routable else 0
                if state.routable:
                    regions[state.region].add(key)
                runtime.add_metric(labels, self._bundle_labels(key, state.version))
            if state.intended is not None:
                intended_key = self._registry.version_key(state.intended)
                intended.add_metric(labels, self._bundle_labels(intended_key, state.intended))
            drift.add_metric(labels, 1.0 if _drifted(self._registry, state) else 0.0)
        serving.add_metric([], float(len(snapshot.serving_keys())))
        for region in sorted(regions):
            region_versions.add_metric([region], float(len(regions[region])))
        for (key, region), count in sorted(per_version.items()):
            version_backends.add_metric([key, prompt_of(key), region], float(count))
        yield from (serving, region_versions, version_backends, healthy, draining)
        yield from (runtime, intended, drift)
        last_seen = GaugeMetricFamily(
            "pinproxy_version_last_seen_timestamp_seconds",
            "When a backend last reported the version (Unix time). Pinned sessions of a "
            "version unseen for versions.retire_after_s are repinned; before that they wait "
            "and get 503.",
            labels=["version_key", "prompt_version"],
        )
        for key, seen in sorted(snapshot.version_last_seen.items()):
            last_seen.add_metric([key, prompt_of(key)], seen)
        yield last_seen
        pinned = self.pinned
        if pinned is not None:
            family = GaugeMetricFamily(
                "pinproxy_pinned_sessions",
                "Live sessions pinned to each version known to this proxy (from the pin store).",
                labels=["version_key", "prompt_version"],
            )
            for key, count in sorted(pinned.items()):
                family.add_metric([key, prompt_of(key)], float(count))
            yield family
        if self.draining is not None:
            yield from _draining_families(self.draining)
        if self.coverage is not None:
            yield from _coverage_families(self.coverage)

    @staticmethod
    def _bundle_labels(key: str, bundle: VersionBundle | None) -> dict[str, str]:
        values = bundle.as_dict() if bundle is not None else {}
        return {"version_key": key, **{dim: values.get(dim, "") for dim in DIMENSIONS}}

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
        InfoMetricFamily,
        GaugeMetricFamily,
    ]:
        backend = ["backend", "region"]
        return (
            GaugeMetricFamily(
                "pinproxy_versions_serving",
                "Distinct version keys with at least one healthy backend, fleet-wide.",
            ),
            GaugeMetricFamily(
                "pinproxy_region_versions_serving",
                "Distinct version keys with at least one healthy backend in the region.",
                labels=["region"],
            ),
            GaugeMetricFamily(
                "pinproxy_version_backends",
                "Healthy backends whose runtime reports the version, per region "
                "(0: backends report it but none is healthy).",
                labels=["version_key", "prompt_version", "region"],
            ),
            GaugeMetricFamily(
                "pinproxy_backend_healthy", "1 while the backend is healthy.", labels=backend
            ),
            GaugeMetricFamily(
                "pinproxy_backend_draining",
                "1 while the backend takes no new sessions.",
                labels=backend,
            ),
            InfoMetricFamily(
                "pinproxy_backend_runtime_version",
                "The version bundle the backend's runtime reports (the routing authority).",
                labels=backend,
            ),
            InfoMetricFamily(
                "pinproxy_backend_intended_version",
                "The version bundle the rollout controller says it deployed to the backend.",
                labels=backend,
            ),
            GaugeMetricFamily(
                "pinproxy_backend_version_drift",
                "1 while an intended version is set and the runtime reports another "
                "(or nothing yet).",
                labels=backend,
            ),
        )

    def __repr__(self) -> str:
        return f"FleetCollector(registry={self._registry!r})"


def _draining_families(drains: Mapping[str, Draining]) -> Iterator[Metric]:
    labels = ["version_key", "prompt_version"]
    active = GaugeMetricFamily(
        "pinproxy_version_active_sessions",
        "Sessions pinned to each version whose last request is within "
        "versions.active_window_s (from the pin store): 0 means its capacity can go.",
        labels=labels,
    )
    expires = GaugeMetricFamily(
        "pinproxy_version_last_pin_expiry_timestamp_seconds",
        "When the last pin of the version expires if its sessions stay idle (Unix time).",
        labels=labels,
    )
    for key, drain in sorted(drains.items()):
        active.add_metric([key, prompt_of(key)], float(drain.active))
        if drain.last_expires_at is not None:
            expires.add_metric([key, prompt_of(key)], drain.last_expires_at)
    yield active
    yield expires


def _coverage_families(rows: Sequence[Coverage]) -> Iterator[Metric]:
    labels = ["region", "version_key", "prompt_version"]
    share = GaugeMetricFamily(
        "pinproxy_production_share",
        "Share of the region's production requests (eval traffic excluded) the version "
        "answered over evals.window_s.",
        labels=labels,
    )
    gap = GaugeMetricFamily(
        "pinproxy_eval_coverage_gap",
        "1 while the version carries more than evals.min_production_share of the region's "
        "production requests and no eval request exercised it there in evals.window_s.",
        labels=labels,
    )
    for row in rows:
        values = [row.region, row.version_key, prompt_of(row.version_key)]
        share.add_metric(values, row.production_share)
        gap.add_metric(values, 1.0 if row.uncovered else 0.0)
    yield share
    yield gap


def _drifted(registry: Registry, state: BackendState) -> bool:
    if state.intended is None:
        return False
    return registry.version_key(state.intended) != state.version_key
