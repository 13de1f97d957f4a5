"""Where the rollout state and the fleet's rollout decisions live.

Theory of operation
-------------------
The rollout state (``proxy.core.rollout.RolloutState``) is shared by every pinproxy
replica and changed only by compare-and-set on its ``rev``: of two replicas deciding
the same flip, one write wins and the other reloads and finds it done. The decisions
(``RolloutEvent``) that a change carries are written *with* it, by the same atomic
step, so a decision the fleet takes once (a region flip, a kill-switch trip, a
rollback) is recorded once, by the replica whose write won, and never by a replica
whose write lost. Decisions that change no state (an operator forcing the version
already current) are appended on their own.

``RedisRolloutStore`` keeps the state as one JSON document and the decisions in a
capped stream (``XADD ... MAXLEN events_kept``), each entry naming the replica that
decided it; a Lua script checks the rev, writes the document, appends the events and
PUBLISHes a change notice, so every replica reloads at once. The stream's key shares
the document's hash slot (``{<state key>}:events``), so the script also runs on a
Redis Cluster. ``LocalRolloutStore`` (the memory pin store: one process) keeps both
in memory, as the fleet of one it is.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from proxy.core.errors import ProxyError
from proxy.core.outage import OutageLog
from proxy.core.rollout import RegionState, RolloutEvent, RolloutState
from proxy.redis.call import RedisCall, RedisFailure
from proxy.redis.pubsub import Subscriber, stop

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from redis.asyncio import Redis

    from proxy.core.clock import Clock
    from proxy.redis.metrics import RedisMetrics

logger = logging.getLogger(__name__)


class RolloutUnavailable(ProxyError):
    """The shared rollout state or its decisions could not be read or written."""

    status = 503
    error_type = "rollout_state_unavailable"
    default_code = "rollout_state_unavailable"


class RolloutStore(Protocol):
    async def load(self) -> RolloutState: ...

    async def swap(self, expected_rev: int, state: RolloutState,
                   events: Sequence[RolloutEvent] = ()) -> bool:
        """Write ``state`` and record ``events`` if the stored rev is still
        ``expected_rev``, all or nothing; True if written."""
        ...

    async def record(self, events: Sequence[RolloutEvent]) -> None:
        """Record decisions that changed no state."""
        ...

    async def events(self, limit: int) -> list[RolloutEvent]:
        """The fleet's latest ``limit`` decisions, oldest first."""
        ...

    async def start(self, changed: Callable[[], Awaitable[None]]) -> None: ...
    async def close(self) -> None: ...


class LocalRolloutStore:
    def __init__(self, events_kept: int) -> None:
        self._state = RolloutState()
        self._events: deque[RolloutEvent] = deque(maxlen=events_kept)

    async def load(self) -> RolloutState:
        return self._state

    async def swap(self, expected_rev: int, state: RolloutState,
                   events: Sequence[RolloutEvent] = ()) -> bool:
        if self._state.rev != expected_rev:
            return False
        self._state = state
        self._events.extend(events)
        return True

    async def record(self, events: Sequence[RolloutEvent]) -> None:
        self._events.extend(events)

    async def events(self, limit: int) -> list[RolloutEvent]:
        return list(self._events)[-limit:] if limit else []

    async def start(self, changed: Callable[[], Awaitable[None]]) -> None:
        return None

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"LocalRolloutStore(rev={self._state.rev}, events={len(self._events)})"


# KEYS[1]: the state; KEYS[2]: the decisions' stream. ARGV[1]: the expected rev; ARGV[2]:
# the new document; ARGV[3]: the channel; ARGV[4]: the stream's cap; ARGV[5..]: one
# decision each. The rev lives inside the document, so one GET reads both.
_SWAP = """
local doc = redis.call('GET', KEYS[1])
local rev = 0
if doc then rev = cjson.decode(doc)['rev'] end
if tonumber(rev) ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
for i = 5, #ARGV do
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '*', 'e', ARGV[i])
end
redis.call('PUBLISH', ARGV[3], 'changed')
return 1
"""


def _unavailable(failure: RedisFailure) -> RolloutUnavailable:
    # The exception's class only: its text could carry connection details.
    return RolloutUnavailable(
        f"the shared rollout state is unavailable ({failure.what}): {failure.kind}",
        code="rollout_state_unavailable",
    )


def _events_unavailable(failure: RedisFailure) -> RolloutUnavailable:
    return RolloutUnavailable(
        f"the fleet's rollout decisions cannot be read ({failure.what}): {failure.kind}",
        code="rollout_events_unavailable",
    )


def events_key(state_key: str) -> str:
    """The stream's key, in the state key's Redis Cluster hash slot."""
    opened = state_key.find("{")
    if opened != -1 and state_key.find("}", opened + 1) > opened + 1:
        return f"{state_key}:events"  # the prefix carries a hash tag already
    return f"{{{state_key}}}:events"


class RedisRolloutStore:
    """The state as one JSON document in Redis, swapped by a Lua compare-and-set that
    also appends the change's decisions to a capped stream."""

    def __init__(self, redis: Redis, key_prefix: str, clock: Clock, op_timeout_s: float,
                 *, events_kept: int, redis_metrics: RedisMetrics | None = None) -> None:
        self._redis = redis
        self._key = f"{key_prefix}rollout"
        self._events_key = events_key(self._key)
        self._channel = f"{key_prefix}rollout:changed"
        self._events_kept = events_kept
        self._clock = clock
        self._timeout = op_timeout_s
        self._call = RedisCall(
            op_timeout_s, _unavailable, clock=clock.monotonic, metrics=redis_metrics,
            component="rollout", operations=("load", "swap", "record"),
        )
        # Its own helper: a failed read of the decisions is its own error code.
        self._read_events = RedisCall(
            op_timeout_s, _events_unavailable, clock=clock.monotonic, metrics=redis_metrics,
            component="rollout", operations=("events",),
        )
        self._swap = redis.register_script(_SWAP)
        self._subscriber: Subscriber | None = None
        self._task: asyncio.Task[None] | None = None
        self._outage = OutageLog(logger, "rollout subscription")

    async def load(self) -> RolloutState:
        raw = await self._call("load", self._redis.get(self._key))
        return RolloutState() if raw is None else state_from_json(raw)

    async def swap(self, expected_rev: int, state: RolloutState,
                   events: Sequence[RolloutEvent] = ()) -> bool:
        args: list[bytes | str | int] = [
            expected_rev, state_to_json(state), self._channel, self._events_kept,
            *(event_to_json(e) for e in events),
        ]
        written = await self._call(
            "swap", self._swap(keys=[self._key, self._events_key], args=args)
        )
        return bool(written)

    async def record(self, events: Sequence[RolloutEvent]) -> None:
        async def append() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                for event in events:
                    pipe.xadd(self._events_key, {"e": event_to_json(event)},
                              maxlen=self._events_kept, approximate=False)
                await pipe.execute()

        if events:
            await self._call("record", append())

    async def events(self, limit: int) -> list[RolloutEvent]:
        if limit <= 0:
            return []
        entries = await self._read_events(
            "events", self._redis.xrevrange(self._events_key, count=limit)
        )
        out: list[RolloutEvent] = []
        for entry_id, fields in reversed(entries or []):
            try:
                out.append(event_from_json((fields or {})[b"e"]))
            except (ValueError, TypeError, KeyError) as exc:
                # One garbled entry must not hide the fleet's other decisions.
                logger.warning("ignoring unreadable rollout event %r: %s", entry_id, exc)
        return out

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
        await stop(self._subscriber, self._task, timeout_s=1.0 + 2 * self._timeout,
                   what="rollout subscription")
        self._task = None

    def __repr__(self) -> str:
        return f"RedisRolloutStore(key={self._key!r}, events={self._events_key!r})"


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


def event_to_json(event: RolloutEvent) -> bytes:
    return orjson.dumps({
        "at": event.at, "kind": event.kind, "region": event.region,
        "version": event.version, "detail": dict(event.detail), "replica": event.replica,
    }, default=str)


def event_from_json(raw: Any) -> RolloutEvent:
    data = orjson.loads(raw)
    detail = data.get("detail") or {}
    if not isinstance(detail, dict):
        raise TypeError("detail is not an object")
    replica = data.get("replica")
    return RolloutEvent(
        at=float(data["at"]), kind=data["kind"], region=str(data["region"]),
        version=str(data["version"]), detail=detail,
        replica=None if replica is None else str(replica),
    )
