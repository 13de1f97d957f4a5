"""Runs the rollout discipline (proxy/core/rollout.py): shares its state, acts on its events.

Theory of operation
-------------------
Every ``check_interval_s`` (and whenever a replica announces a change) each pinproxy
replica loads the shared ``RolloutState``, moves it on with ``rollout.evaluate`` over
its own registry snapshot, and, when that changed anything, writes it back by
compare-and-set on the state's ``rev``: of two replicas deciding the same flip, one
write wins and the other reloads and finds it done. So a region flips in one instant
for the whole fleet (the winner's), and every replica applies the same
``region_current`` to its registry (``Registry.set_rollout``), which routing reads.
With the memory store there is one process and the state is only kept here.

The soak judge runs here too: ``SoakCounter`` is a request observer that counts, per
(region, version), answered requests and their failures (5xx and gateway errors;
structured-output failures among requests that asked for JSON), and eval results
pushed through the admin API. Each replica judges what it proxied itself; a
regression found by any replica halts the rollout for all of them: the version is
blocked for new sessions through the control plane (fleet-wide, like an operator's
block) and every region that runs it returns to its previous version in the same
compare-and-set. A replica's false-alarm rate is the rule's ``alpha``; the fleet's is at
most replicas x alpha.

Every decision is a ``RolloutEvent``: kept (the last ``events_kept``) for
``GET /admin/rollout``, logged, and counted in ``pinproxy_rollout_events_total``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

import orjson
from prometheus_client import Counter, Gauge

from proxy.core.errors import ProxyError
from proxy.core.models import prompt_of
from proxy.core.outage import OutageLog
from proxy.core.rollout import (
    Counts,
    RegionState,
    RolloutEvent,
    RolloutPolicy,
    RolloutState,
    Signal,
    evaluate,
    force,
    judge,
    roll_back,
    with_rollback,
)
from proxy.core.tasks import stop_tasks
from proxy.redis.call import RedisCall, RedisFailure
from proxy.redis.pubsub import Subscriber

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from prometheus_client import CollectorRegistry
    from redis.asyncio import Redis

    from proxy.config.rollout import RolloutConfig
    from proxy.core.clock import Clock
    from proxy.core.events import RequestEvent
    from proxy.fleet.registry import Registry
    from proxy.redis.metrics import RedisMetrics

logger = logging.getLogger(__name__)


class RolloutUnavailable(ProxyError):
    status = 503
    error_type = "rollout_state_unavailable"
    default_code = "rollout_state_unavailable"


def policy_from(config: RolloutConfig) -> RolloutPolicy:
    return RolloutPolicy(
        mode=config.mode, modes=dict(config.region_modes), settle_s=config.settle_s,
        soak_s=config.soak_s, max_soaking_regions=config.max_soaking_regions,
        on_current_lost=config.on_current_lost, alpha=config.alpha, margin=config.margin,
        min_samples=config.min_samples, check_interval_s=config.check_interval_s,
    )


# --- counting what each version does in each region ----------------------------------------


Cell = tuple[str, str]  # (region, version key)


class SoakCounter:
    """A RequestObserver: cumulative trials and failures per (region, version, signal)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, Signal], list[int]] = {}

    def observe(self, event: RequestEvent) -> None:
        if event.backend_id is None or event.region is None or event.version_key is None:
            return
        if event.eval_run:
            return  # eval traffic is not production: its verdict comes through push_evals
        failed = event.status >= 500 or event.error_type in ("upstream_error", "upstream_timeout")
        self.add(event.region, event.version_key, "errors", 1, int(failed))
        if event.structured_output_valid is not None:
            self.add(event.region, event.version_key, "structured_output", 1,
                     int(not event.structured_output_valid))

    def add(self, region: str, version: str, signal: Signal, trials: int, failures: int) -> None:
        cell = self._counts.get((region, version, signal))
        if cell is None:
            cell = self._counts[(region, version, signal)] = [0, 0]
        cell[0] += trials
        cell[1] += failures

    def totals(self, version: str, region: str | None = None) -> dict[Signal, Counts]:
        """Counts of ``version`` in ``region`` (every region: None)."""
        out: dict[Signal, list[int]] = {}
        for (r, v, signal), (trials, failures) in self._counts.items():
            if v == version and (region is None or r == region):
                acc = out.setdefault(signal, [0, 0])
                acc[0] += trials
                acc[1] += failures
        return {s: Counts(t, f) for s, (t, f) in out.items()}

    def __repr__(self) -> str:
        return f"SoakCounter(cells={len(self._counts)})"


def _minus(now: Mapping[Signal, Counts], base: Mapping[Signal, Counts]) -> dict[Signal, Counts]:
    out: dict[Signal, Counts] = {}
    for signal, c in now.items():
        b = base.get(signal, Counts())
        out[signal] = Counts(c.trials - b.trials, c.failures - b.failures)
    return out


# --- the shared state ---------------------------------------------------------------------


class RolloutStore(Protocol):
    async def load(self) -> RolloutState: ...
    async def swap(self, expected_rev: int, state: RolloutState) -> bool:
        """Write ``state`` if the stored rev is still ``expected_rev``; True if written."""
        ...
    async def start(self, changed: Callable[[], Awaitable[None]]) -> None: ...
    async def close(self) -> None: ...


class LocalRolloutStore:
    def __init__(self) -> None:
        self._state = RolloutState()

    async def load(self) -> RolloutState:
        return self._state

    async def swap(self, expected_rev: int, state: RolloutState) -> bool:
        if self._state.rev != expected_rev:
            return False
        self._state = state
        return True

    async def start(self, changed: Callable[[], Awaitable[None]]) -> None:
        return None

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"LocalRolloutStore(rev={self._state.rev})"


# KEYS[1]: the state; ARGV[1]: the expected rev; ARGV[2]: the new document; ARGV[3]: the
# channel. The rev lives inside the document, so one GET reads both.
_SWAP = """
local doc = redis.call('GET', KEYS[1])
local rev = 0
if doc then rev = cjson.decode(doc)['rev'] end
if tonumber(rev) ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], 'changed')
return 1
"""


def _unavailable(failure: RedisFailure) -> RolloutUnavailable:
    # The exception's class only: its text could carry connection details.
    return RolloutUnavailable(
        f"the shared rollout state is unavailable ({failure.what}): {failure.kind}",
        code="rollout_state_unavailable",
    )


class RedisRolloutStore:
    """The state as one JSON document in Redis, swapped by a Lua compare-and-set."""

    def __init__(self, redis: Redis, key_prefix: str, clock: Clock, op_timeout_s: float,
                 *, redis_metrics: RedisMetrics | None = None) -> None:
        self._redis = redis
        self._key = f"{key_prefix}rollout"
        self._channel = f"{key_prefix}rollout:changed"
        self._clock = clock
        self._timeout = op_timeout_s
        self._call = RedisCall(
            op_timeout_s, _unavailable, clock=clock.monotonic, metrics=redis_metrics,
            component="rollout", operations=("load", "swap"),
        )
        self._swap = redis.register_script(_SWAP)
        self._subscriber: Subscriber | None = None
        self._task: asyncio.Task[None] | None = None
        self._outage = OutageLog(logger, "rollout subscription")

    async def load(self) -> RolloutState:
        raw = await self._call("load", self._redis.get(self._key))
        return RolloutState() if raw is None else state_from_json(raw)

    async def swap(self, expected_rev: int, state: RolloutState) -> bool:
        written = await self._call(
            "swap", self._swap(keys=[self._key], args=[expected_rev, state_to_json(state),
                                                 self._channel])
        )
        return bool(written)

    async def start(self, changed: Callable[[], Awaitable[None]]) -> None:
        async def on_messages(batch: list[object]) -> None:
            await changed()

        async def on_subscribed() -> None:
            self._outage.succeeded()
            await changed()

        self._subscriber = Subscriber(
            self._redis, self._channel, clock=self._clock, rng=random.Random(),
            op_timeout_s=self._timeout, poll_s=0.5, on_subscribed=on_subscribed,
            on_messages=on_messages,
            on_lost=self._outage.failed,
        )
        self._task = asyncio.create_task(self._subscriber.run(), name="rollout-sub")

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.close()
        await stop_tasks([self._task], timeout_s=1.0 + 2 * self._timeout,
                         what="rollout subscription")  # fmt: skip
        self._task = None

    def __repr__(self) -> str:
        return f"RedisRolloutStore(key={self._key!r})"


def state_to_json(state: RolloutState) -> bytes:
    return orjson.dumps({
        "rev": state.rev,
        "regions": {r: asdict(s) for r, s in state.regions.items()},
        "rollbacks": dict(state.rollbacks),
    })


def state_from_json(raw: bytes | str) -> RolloutState:
    data = orjson.loads(raw)
    regions = {r: RegionState(**fields) for r, fields in data.get("regions", {}).items()}
    return RolloutState(regions, int(data.get("rev", 0)), dict(data.get("rollbacks", {})))


# --- the controller -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Soak:
    """Where a region's soak started counting: baselines to subtract."""

    version: str
    previous: str
    new_base: Mapping[Signal, Counts]
    old_base: Mapping[Signal, Counts]


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
        stop_timeout_s: float = 5.0,
    ) -> None:
        """``stop_timeout_s``: how long ``close`` waits for a check under way (longer
        than a Redis call's timeout)."""
        self._config = config
        self._policy = policy_from(config)
        self._registry = registry
        self._store = store
        self._counter = counter
        self._block = block
        self._admit = admit
        self._clock = clock
        self._state = RolloutState()
        self._events: deque[RolloutEvent] = deque(maxlen=config.events_kept)
        self._soaks: dict[str, Soak] = {}
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

    def events(self) -> list[RolloutEvent]:
        return list(self._events)

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
                if state is loaded or await self._store.swap(loaded.rev, state):
                    self._adopt(state, events)
                    return
            logger.info("rollout state changed under us three times; next check retries")

    async def _judge(self, state: RolloutState, events: list[RolloutEvent], now: float
                     ) -> tuple[RolloutState, list[RolloutEvent]]:
        for region, rs in state.regions.items():
            if not rs.soaking or rs.previous is None:
                self._soaks.pop(region, None)
                continue
            soak = self._soaks.get(region)
            if soak is None or soak.version != rs.current:
                soak = self._soaks[region] = Soak(
                    rs.current, rs.previous, self._counter.totals(rs.current, region),
                    self._counter.totals(rs.previous),
                )
            new = _minus(self._counter.totals(rs.current, region), soak.new_base)
            old = _minus(self._counter.totals(rs.previous), soak.old_base)
            verdict = judge(new, old, self._policy)
            if not verdict.regressed:
                continue
            evidence = {**verdict.evidence(), "soak_since": rs.since,
                        "window_s": round(now - rs.since, 3), "previous": rs.previous}
            regression = RolloutEvent(now, "regression", region, rs.current, evidence)
            bad = rs.current
            await self._block(bad)
            state, rolled = roll_back(state, bad, now,
                                      repin=self._config.on_regression == "block_and_repin")
            return state, [*events, regression, *rolled]
        return state, events

    def _adopt(self, state: RolloutState, events: list[RolloutEvent]) -> None:
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
                if state is loaded or await self._store.swap(loaded.rev, state):
                    self._adopt(state, [event])
                    return event
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
                if state is loaded or await self._store.swap(loaded.rev, state):
                    self._adopt(state, events)
                    return events
        raise RolloutUnavailable("the rollout state kept changing; try again",
                                 code="rollout_state_busy")

    def _resolve(self, ref: str) -> str:
        keys = sorted(k for k in self._registry.snapshot.serving_keys() if _matches(k, ref))
        return keys[0] if keys else ref

    def push_evals(self, region: str, version: str, passed: int, failed: int) -> None:
        """An eval system's results for a version in a region (the ``evals`` signal)."""
        self._counter.add(region, version, "evals", passed + failed, failed)

    def __repr__(self) -> str:
        return f"RolloutController(rev={self._state.rev}, regions={len(self._state.regions)})"


def _matches(version_key: str, ref: str) -> bool:
    """A version key matches itself or its bare prompt (as the kill switch does)."""
    return version_key == ref or prompt_of(version_key) == ref
