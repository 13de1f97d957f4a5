"""Runs the rollout discipline (proxy/core/rollout.py): cutover by compare-and-set, the
kill switch, operators' forced cutovers and rollbacks.

Theory of operation
-------------------
Every ``check_interval_s`` (and whenever a replica announces a change, or the registry
publishes one) each pinproxy replica loads the shared ``RolloutState``, moves it on
with ``rollout.evaluate`` over its own registry snapshot, judges the regions soaking
(proxy/fleet/rollout_soak.py), and, when that changed anything, writes it back by
compare-and-set on the state's ``rev`` together with the decisions it took
(proxy/fleet/rollout_store.py). Of two replicas deciding the same flip, one write wins
and the other reloads and finds it done; so a region flips in one instant for the
whole fleet (the winner's), that instant is the soak's start on every replica, and the
decision is recorded once, naming the replica that took it. Every replica applies the
same ``region_current`` to its registry (``Registry.set_rollout``), which routing reads.

A regression found by any replica halts the rollout for all of them: the version is
blocked for new sessions through the control plane (fleet-wide, like an operator's
block) and every region that runs it returns to its previous version in the same
compare-and-set.

Every decision is a ``RolloutEvent``: recorded in the shared store (the fleet's list,
``GET /admin/events``), kept here too (the last ``events_kept`` this replica took, the
fallback while the store is away), logged, and counted in
``pinproxy_rollout_events_total``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from proxy.core.errors import ProxyError
from proxy.core.models import prompt_of
from proxy.core.outage import OutageLog
from proxy.core.rollout import (
    RegionState,
    RolloutEvent,
    RolloutPolicy,
    RolloutState,
    evaluate,
    force,
    judge,
    roll_back,
    with_rollback,
)
from proxy.core.tasks import stop_tasks
from proxy.fleet.rollout_soak import SoakBook
from proxy.fleet.rollout_store import RolloutUnavailable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from prometheus_client import CollectorRegistry

    from proxy.config.rollout import RolloutConfig
    from proxy.core.clock import Clock
    from proxy.fleet.registry import Registry
    from proxy.fleet.rollout_soak import SoakCounter
    from proxy.fleet.rollout_store import RolloutStore

logger = logging.getLogger(__name__)


def policy_from(config: RolloutConfig) -> RolloutPolicy:
    return RolloutPolicy(
        mode=config.mode, modes=dict(config.region_modes), settle_s=config.settle_s,
        soak_s=config.soak_s, max_soaking_regions=config.max_soaking_regions,
        on_current_lost=config.on_current_lost, alpha=config.alpha, margin=config.margin,
        min_samples=config.min_samples, check_interval_s=config.check_interval_s,
    )


class RolloutController:
    """Evaluates, shares and applies the rollout state; the kill switch; rollbacks."""

    def __init__(
        self,
        *,
        config: RolloutConfig,
        registry: Registry,
        store: RolloutStore,
        counter: SoakCounter,
        block: Callable[[str], Awaitable[None]],
        admit: Callable[[str], Awaitable[None]],
        clock: Clock,
        metrics_registry: CollectorRegistry,
        replica: str,
        stop_timeout_s: float = 5.0,
    ) -> None:
        """``replica``: this pinproxy replica's name, recorded with its decisions;
        ``stop_timeout_s``: how long ``close`` waits for a check under way (longer than
        a Redis call's timeout)."""
        self._config = config
        self._policy = policy_from(config)
        self._registry = registry
        self._store = store
        self._counter = counter
        self._block = block
        self._admit = admit
        self._clock = clock
        self._state = RolloutState()
        self._replica = replica
        self._events: deque[RolloutEvent] = deque(maxlen=config.events_kept)
        self._book = SoakBook(counter.ledger)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._stop_timeout_s = stop_timeout_s
        self._checks = OutageLog(logger, "rollout checks")
        self._event_count = Counter(
            "pinproxy_rollout_events", "Rollout decisions, by kind (flipped, held_back, "
            "regression, rolled_back, soak_passed, forced, initialised).",
            ["kind", "region"], registry=metrics_registry,
        )
        # Each configured region's decisions exist at 0 from the start, so an alert's
        # increase() sees its first kill-switch trip (a series born at 1 has not increased).
        for region in sorted({s.region for s in registry.snapshot.backends}):
            for kind in ("flipped", "held_back", "regression", "rolled_back"):
                self._event_count.labels(kind, region)
        self._region_state = Gauge(
            "pinproxy_rollout_region_state", "1 for each region's current state.",
            ["region", "state", "current_version"], registry=metrics_registry,
        )
        self._held_back = Gauge(
            "pinproxy_rollout_held_back", "1 while a region's candidate version (every "
            "replica runs it) is held back from becoming current, by reason.",
            ["region", "candidate", "reason"], registry=metrics_registry,
        )

    @property
    def state(self) -> RolloutState:
        return self._state

    @property
    def policy(self) -> RolloutPolicy:
        return self._policy

    @property
    def replica(self) -> str:
        return self._replica

    def events(self) -> list[RolloutEvent]:
        """The decisions this replica took (the last ``events_kept``), oldest first."""
        return list(self._events)

    async def fleet_events(self, limit: int) -> list[RolloutEvent]:
        """Every replica's latest ``limit`` decisions, oldest first, from the shared
        store; raises ``RolloutUnavailable`` while it cannot be read."""
        return await self._store.events(limit)

    async def start(self) -> None:
        async def changed() -> None:
            self._wake.set()

        try:
            await self.tick()
        except ProxyError as exc:
            logger.warning("rollout state not loaded at start: %s", exc.message)
        await self._store.start(changed)
        self._task = asyncio.create_task(self._run(), name="rollout")

    async def close(self) -> None:
        # The flag ends the loop even if a cancellation is swallowed on the way (see
        # proxy/core/tasks.py); the wake-up ends its wait at once.
        self._closed = True
        self._wake.set()
        await stop_tasks([self._task], timeout_s=self._stop_timeout_s, what="rollout checks")
        self._task = None
        await self._store.close()

    async def _run(self) -> None:
        # A check runs at once when the registry publishes a change (a replica reports
        # a new version) or another replica announces one, else every interval.
        while not self._closed:
            woken = asyncio.ensure_future(self._wake.wait())
            changed = asyncio.ensure_future(
                self._registry.wait_for_change(self._policy.check_interval_s)
            )
            try:
                await asyncio.wait((woken, changed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()
                changed.cancel()
            self._wake.clear()
            try:
                await self.tick()
                self._checks.succeeded()
            except ProxyError as exc:
                self._checks.failed(exc.message)
            except Exception:  # the loop must outlive a bug in one check
                logger.exception("rollout check failed")

    async def tick(self) -> None:
        """One check: load, evaluate, judge soaks, write back by compare-and-set, apply."""
        async with self._lock:
            for _ in range(3):
                loaded = await self._store.load()
                now = self._clock.time()
                state, events = evaluate(loaded, self._registry.snapshot, self._policy, now)
                state, events = await self._judge(state, events, now)
                if await self._commit(loaded, state, events) is not None:
                    return
            logger.info("rollout state changed under us three times; next check retries")

    async def _judge(self, state: RolloutState, events: list[RolloutEvent], now: float
                     ) -> tuple[RolloutState, list[RolloutEvent]]:
        self._book.forget(set(state.regions))
        for region, rs in state.regions.items():
            sides = self._book.sides(region, rs)
            if sides is None or rs.previous is None:
                continue
            verdict = judge(sides.new, sides.old, self._policy)
            if not verdict.regressed:
                continue
            evidence = {**verdict.evidence(), "soak_since": rs.since,
                        "window_s": round(now - rs.since, 3), "previous": rs.previous,
                        "baseline_at_flip": sides.exact}
            regression = RolloutEvent(now, "regression", region, rs.current, evidence)
            bad = rs.current
            await self._block(bad)
            state, rolled = roll_back(state, bad, now,
                                      repin=self._config.on_regression == "block_and_repin")
            return state, [*events, regression, *rolled]
        return state, events

    async def _commit(self, loaded: RolloutState, state: RolloutState,
                      events: Sequence[RolloutEvent]) -> list[RolloutEvent] | None:
        """Write ``state`` over ``loaded`` with its decisions, stamped with this replica
        (returned); None when another replica changed the state first (nothing written)."""
        stamped = [replace(e, replica=self._replica) for e in events]
        if state is loaded:
            await self._store.record(stamped)
        elif not await self._store.swap(loaded.rev, state, stamped):
            return None
        self._adopt(state, stamped)
        return stamped

    def _adopt(self, state: RolloutState, events: Sequence[RolloutEvent]) -> None:
        self._state = state
        atomic = {r: s.current for r, s in state.regions.items()
                  if self._policy.mode_of(r) == "atomic"}
        self._registry.set_rollout(atomic, state.rollbacks)
        self._region_state.clear()
        self._held_back.clear()
        for region, rs in state.regions.items():
            self._region_state.labels(region, rs.phase, rs.current).set(1)
            if rs.candidate is not None and rs.held is not None:
                self._held_back.labels(region, rs.candidate, rs.held).set(1)
        for event in events:
            self._record(event)

    def _record(self, event: RolloutEvent) -> None:
        self._events.append(event)
        self._event_count.labels(event.kind, event.region).inc()
        level = logging.WARNING if event.kind in ("regression", "rolled_back", "held_back") \
            else logging.INFO
        logger.log(level, "rollout %s: region %s, version %s %s", event.kind, event.region,
                   event.version, dict(event.detail))

    # -- operator actions ---------------------------------------------------------------

    async def force(self, region: str, version: str) -> RolloutEvent:
        """Make ``version`` current in ``region`` now (an operator's override)."""
        async with self._lock:
            for _ in range(3):
                loaded = await self._store.load()
                state, event = force(loaded, region, version, self._clock.time())
                recorded = await self._commit(loaded, state, [event])
                if recorded is not None:
                    return recorded[0]
        raise RolloutUnavailable("the rollout state kept changing; try again",
                                 code="rollout_state_busy")

    async def rollback(self, bad: str, to: str) -> list[RolloutEvent]:
        """Block ``bad``, return its regions to ``to`` and repin its sessions lazily.

        ``bad`` and ``to`` are version keys or bare prompts. Per region, the target is
        the region's previous version when it matches ``to`` (so a parser that changed
        in some regions only is rolled back to each region's own bundle), else a
        version matching ``to`` that the region's backends report, else ``to``.
        """
        await self._block(bad)
        await self._admit(to)  # the known-good version takes new sessions again
        snapshot = self._registry.snapshot

        def target(region: str, rs: RegionState) -> str | None:
            if rs.previous is not None and _matches(rs.previous, to):
                return rs.previous
            local = sorted({s.version_key for s in snapshot.backends
                            if s.region == region and s.version_key
                            and _matches(s.version_key, to)})
            return local[0] if local else self._resolve(to)

        async with self._lock:
            for _ in range(3):
                loaded = await self._store.load()
                bad_keys = {r.current for r in loaded.regions.values()
                            if _matches(r.current, bad)} or {bad}
                state = loaded
                events: list[RolloutEvent] = []
                now = self._clock.time()
                for key in sorted(bad_keys):
                    state, more = roll_back(state, key, now, target=target, repin=True)
                    events += more
                    if key not in state.rollbacks:
                        # No region had it current: its sessions still move back.
                        state = RolloutState(state.regions, loaded.rev + 1, with_rollback(
                            state.rollbacks, key, self._resolve(to)))
                recorded = await self._commit(loaded, state, events)
                if recorded is not None:
                    return recorded
        raise RolloutUnavailable("the rollout state kept changing; try again",
                                 code="rollout_state_busy")

    def _resolve(self, ref: str) -> str:
        keys = sorted(k for k in self._registry.snapshot.serving_keys() if _matches(k, ref))
        return keys[0] if keys else ref

    def push_evals(self, region: str, version: str, passed: int, failed: int) -> None:
        """An eval system's results for a version in a region (the ``evals`` signal)."""
        self._counter.push_evals(region, version, passed, failed)

    def __repr__(self) -> str:
        return f"RolloutController(rev={self._state.rev}, regions={len(self._state.regions)})"


def _matches(version_key: str, ref: str) -> bool:
    """A version key matches itself or its bare prompt (as the kill switch does)."""
    return version_key == ref or prompt_of(version_key) == ref
