"""The registry: what every backend's runtime says it serves, and whether it is healthy.

Theory of operation. The registry is the only writer of backend state. Every input
(a ``/version`` poll, a response stamp, an admin push, a failed connection) is
applied at once and, when it changes anything routing can see, a new immutable
``Snapshot`` replaces the old one in a single assignment. Routing reads whichever
snapshot is current and never sees half an update.

The runtime is the authority (invariant 2): the last report wins, whatever its
source, because each report is a fresh observation of the same runtime. A response
stamp only speaks for the dimensions it carries (see ``VersionBundle.overlay``).

Health has hysteresis so a flapping check does not flap routing: a healthy backend
turns unhealthy after ``unhealthy_after`` consecutive failed polls, an unhealthy one
healthy after ``healthy_after`` consecutive successes. A backend never seen healthy
is admitted on its first success: at start there is no history to protect.

Passive health: a request whose connection was refused or reset marks its backend
*suspect* (``mark_suspect``): unhealthy at once, without waiting for polls to fail,
and readmitted by the first successful ``/version`` poll after it (the data plane
asks for one at once), so a backend that restarted, perhaps with another version at
the same URL, is re-checked before it gets pinned traffic again. A push-mode backend
cannot be polled; it is ejected for ``base_ejection_s`` instead.

Outlier detection (``report_result``, proxy/core/outlier.py) ejects a backend whose
requests keep failing, for a growing interval, within a per-version share.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from proxy.core.models import (
    Backend,
    BackendState,
    Dimension,
    ReportSource,
    Snapshot,
    VersionBundle,
)
from proxy.core.outlier import OutlierPolicy, OutlierState

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from proxy.core.clock import Clock

logger = logging.getLogger(__name__)

# Retirement is measured in minutes; refreshing "last seen" more often than this
# would only churn snapshots.
_LAST_SEEN_GRANULARITY_S = 1.0


@dataclass(slots=True)
class _Health:
    healthy: bool = False
    ever_healthy: bool = False
    successes: int = 0
    failures: int = 0
    suspect: bool = False  # marked by a failed connection; a fresh poll readmits it
    # The registry's check counter when the backend was last marked suspect: only a
    # check begun after it is fresh (one already in flight may answer from before).
    suspected_at: int = -1
    outlier: OutlierState = field(default_factory=OutlierState)
    transitions: list[tuple[float, bool, str]] = field(default_factory=list)


class Registry:
    """Owns backend state; publishes immutable snapshots; wakes waiters on change."""

    def __init__(
        self,
        backends: Iterable[Backend],
        *,
        dimensions: tuple[Dimension, ...],
        unhealthy_after: int,
        healthy_after: int,
        clock: Clock,
        on_health_change: Callable[[str, str, bool], None] | None = None,
        outlier: OutlierPolicy | None = None,
        on_ejection: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self._dimensions = dimensions
        # Told (backend id, region, now healthy?) after every health transition, e.g.
        # to count it; it must be cheap and must not raise.
        self._on_health_change = on_health_change
        self._outlier = outlier or OutlierPolicy()
        self._checks = 0  # health checks begun (see check_started)
        # Told (backend id, region, why) after every ejection; cheap, must not raise.
        self._on_ejection = on_ejection
        self._unhealthy_after = unhealthy_after
        self._healthy_after = healthy_after
        self._clock = clock
        self._states: dict[str, BackendState] = {}
        self._health: dict[str, _Health] = {}
        self._last_seen: dict[str, float] = {}
        self._blocked: frozenset[str] = frozenset()
        self._region_current: dict[str, str] = {}
        self._rollbacks: dict[str, str] = {}
        self._started_at = clock.time()
        self._changed = asyncio.Event()
        self._snapshot = Snapshot(started_at=self._started_at)
        for backend in backends:
            self._states[backend.id] = BackendState(backend=backend)
            self._health[backend.id] = _Health()
        self._publish()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def dimensions(self) -> tuple[Dimension, ...]:
        return self._dimensions

    def version_key(self, bundle: VersionBundle) -> str:
        return bundle.key(self._dimensions)

    def health_history(self, backend_id: str) -> list[tuple[float, bool, str]]:
        """(time, healthy, why) for every health transition of the backend, oldest first."""
        return list(self._health[backend_id].transitions)

    # -- inputs -----------------------------------------------------------------

    def report_version(self, backend_id: str, bundle: VersionBundle, source: ReportSource) -> str:
        """Apply a runtime report; return the backend's version key after it."""
        state = self._states.get(backend_id)
        if state is None:
            return self.version_key(bundle)
        now = self._clock.time()
        # A response stamp naming the known version hands that very bundle back
        # (report_stamp): its key is the one stored with it, not rebuilt per response.
        stored = state.version_key
        if bundle is state.version and stored is not None:
            key, changed = stored, False
        else:
            key, changed = self.version_key(bundle), state.version != bundle
        if changed:
            if state.version_key is not None and state.version_key != key:
                logger.warning(
                    "backend %s now reports version %s (was %s; source %s)",
                    backend_id,
                    key,
                    state.version_key,
                    source,
                )
            self._states[backend_id] = replace(
                state, version=bundle, version_key=key, reported_at=now, report_source=source
            )
        elif (
            state.report_source != source
            or state.reported_at is None
            or now - state.reported_at >= _LAST_SEEN_GRANULARITY_S
        ):
            # Same version again: remember when, but don't publish a snapshot for it.
            # Every response stamps, so within a second the time is left as it was:
            # snapshots publish it at that granularity anyway, and a replace() per
            # response was a measurable share of the request path.
            self._states[backend_id] = replace(state, reported_at=now, report_source=source)
        previous = self._last_seen.get(key)
        seen_moved = previous is None or now - previous >= _LAST_SEEN_GRANULARITY_S
        if seen_moved:
            self._last_seen[key] = now
        if changed or seen_moved:
            self._publish()
        return key

    def report_stamp(self, backend_id: str, stamp: Mapping[Dimension, str]) -> str | None:
        """Apply a response stamp; return the backend's version key after it.

        Returns None when the stamp lacks a prompt and nothing was known before.
        """
        state = self._states.get(backend_id)
        if state is None:
            return None
        current = state.version
        if current is not None and all(getattr(current, dim) == v for dim, v in stamp.items()):
            # The usual case: the stamp says what we already knew; no new bundle to build.
            return self.report_version(backend_id, current, "stamp")
        if current is not None:
            bundle = current.overlay(stamp)
        elif "prompt" in stamp:
            bundle = VersionBundle(prompt=stamp["prompt"]).overlay(stamp)
        else:
            return None
        return self.report_version(backend_id, bundle, "stamp")

    def check_started(self) -> int:
        """A token for a health check about to begin; give it to ``report_success``."""
        self._checks += 1
        return self._checks

    def report_success(self, backend_id: str, started: int | None = None) -> None:
        """A health check (``/version`` poll or push) succeeded.

        ``started``: the check's ``check_started`` token. A check that began before the
        backend was marked suspect says nothing about it now (a POP that died while a
        poll was in flight may still have answered it), so it neither readmits the
        backend nor counts towards its health.
        """
        health = self._health.get(backend_id)
        if health is None:
            return
        if health.suspect and started is not None and started <= health.suspected_at:
            return
        health.failures = 0
        health.successes += 1
        if not health.healthy and (
            not health.ever_healthy or health.successes >= self._healthy_after
            or health.suspect
        ):
            why = "re-polled after a failed connection" if health.suspect else "check succeeded"
            health.suspect = False
            self._set_health(backend_id, health, True, why)

    def mark_suspect(self, backend_id: str, why: str) -> None:
        """Passive health: a connection to the backend was refused or reset."""
        health = self._health.get(backend_id)
        state = self._states.get(backend_id)
        if health is None or state is None:
            return
        if state.backend.version_source != "poll":
            # Nothing can re-poll it: keep it out for a while instead.
            self._eject(backend_id, health, f"passive: {why}", capped=False)
            return
        health.successes = 0
        health.suspect = True
        health.suspected_at = self._checks
        if health.healthy:
            self._set_health(backend_id, health, False, f"passive: {why}")

    def report_result(self, backend_id: str, ok: bool) -> None:
        """A proxied request's result, for outlier detection (5xx and failures: not ok)."""
        health = self._health.get(backend_id)
        if health is None:
            return
        if health.outlier.record(ok, self._clock.time(), self._outlier):
            self._eject(backend_id, health, "consecutive failures", capped=True)

    def report_failure(self, backend_id: str, why: str) -> None:
        health = self._health.get(backend_id)
        if health is None:
            return
        health.successes = 0
        health.failures += 1
        if health.healthy and health.failures >= self._unhealthy_after:
            self._set_health(backend_id, health, False, why)

    # -- administration (used by the admin API) ---------------------------------

    def add_backend(self, backend: Backend) -> None:
        if backend.id in self._states:
            raise KeyError(f"backend {backend.id!r} already exists")
        self._states[backend.id] = BackendState(backend=backend)
        self._health[backend.id] = _Health()
        self._publish()

    def remove_backend(self, backend_id: str) -> None:
        del self._states[backend_id]
        del self._health[backend_id]
        self._publish()

    def set_draining(self, backend_id: str, draining: bool) -> None:
        self._states[backend_id] = replace(self._states[backend_id], draining=draining)
        self._publish()

    def set_blocked(self, versions: frozenset[str]) -> None:
        """Replace the set of version keys / bare prompts blocked for new sessions."""
        if versions != self._blocked:
            self._blocked = frozenset(versions)
            self._publish()

    def set_rollout(self, region_current: Mapping[str, str], rollbacks: Mapping[str, str]) -> None:
        """Publish the rollout state routing reads (see proxy/core/rollout.py)."""
        if (region_current, rollbacks) != (self._region_current, self._rollbacks):
            self._region_current = dict(region_current)
            self._rollbacks = dict(rollbacks)
            self._publish()

    def set_intent(self, backend_id: str, bundle: VersionBundle | None) -> None:
        """Record the controller's intended version for the backend (None clears it).

        Shown beside the runtime report; routing never reads it.
        """
        state = self._states[backend_id]
        if state.intended != bundle:
            self._states[backend_id] = replace(state, intended=bundle)
            self._publish()

    # -- waiting ----------------------------------------------------------------

    async def wait_for_change(self, timeout: float) -> bool:
        """Wait until the next snapshot is published or ``timeout`` passes; True if published."""
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- internals ----------------------------------------------------------------

    def _eject(self, backend_id: str, health: _Health, why: str, *, capped: bool) -> None:
        state = self._states[backend_id]
        now = self._clock.time()
        if capped:
            peers = self._snapshot.by_key.get(state.version_key or "", ())
            out = sum(1 for p in peers if p.ejected_until > now)
            if out + 1 > self._outlier.allowed(len(peers)):
                return  # the version's last backends stay: their errors are their answer
        until = health.outlier.eject(now, self._outlier)
        logger.warning("backend %s ejected for %.1fs (%s)", backend_id, until - now, why)
        self._states[backend_id] = replace(state, ejected_until=until)
        self._publish()
        if self._on_ejection is not None:
            self._on_ejection(backend_id, state.region, why)

    def _set_health(self, backend_id: str, health: _Health, healthy: bool, why: str) -> None:
        health.healthy = healthy
        health.ever_healthy = health.ever_healthy or healthy
        health.transitions.append((self._clock.time(), healthy, why))
        del health.transitions[:-50]
        logger.info("backend %s is %s (%s)", backend_id, "healthy" if healthy else "unhealthy", why)
        state = self._states[backend_id] = replace(self._states[backend_id], healthy=healthy)
        self._publish()
        if self._on_health_change is not None:
            self._on_health_change(backend_id, state.region, healthy)

    def _publish(self) -> None:
        self._snapshot = Snapshot(
            backends=tuple(self._states.values()),
            generation=self._snapshot.generation + 1,
            started_at=self._started_at,
            version_last_seen=dict(self._last_seen),
            blocked_versions=self._blocked,
            region_current=self._region_current,
            rollbacks=self._rollbacks,
        )
        # Wake everyone waiting on the old snapshot; later waiters get a fresh event.
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def __repr__(self) -> str:
        snap = self._snapshot
        healthy = sum(1 for s in snap.backends if s.healthy)
        return (
            f"Registry(backends={len(snap.backends)}, healthy={healthy}, "
            f"versions={sorted(snap.by_key)}, generation={snap.generation})"
        )
