"""The control state in Redis, shared by every replica, with change notices over pub/sub.

Layout: one hash per kind, ``<prefix>control:<kind>`` (``<prefix>{control}:<kind>`` on a
cluster, so all share a slot; see ``control.KINDS``), one field
per backend id or version, JSON values. A change HSETs/HDELs only the fields that
differ and PUBLISHes on ``<prefix>control`` inside one MULTI/EXEC, so the notice goes
out exactly when the change is applied, and concurrent changes to different fields on
different replicas do not overwrite each other. A load reads every hash in one
MULTI/EXEC, so it never sees half of another replica's change.

Hearing changes uses the same ``proxy.pubsub.Subscriber`` as the pin store's
invalidations (reconnect with backoff, ping a quiet subscription), and reloads the
whole state on every (re)subscription, since notices sent while unsubscribed are
lost. Notices that arrive together are coalesced into one reload. A full reload also
runs every ``_RESYNC_S`` as a backstop. The state is small (one field per backend and
blocked version), so a full reload costs one round trip.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from proxy.core.models import Backend, InvalidVersion, VersionBundle
from proxy.core.outage import OutageLog
from proxy.fleet.control import ControlState, ControlUnavailable, PushedReport
from proxy.redis.call import RedisCall, RedisFailure
from proxy.redis.pubsub import Subscriber, stop

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

    from proxy.core.clock import Clock
    from proxy.redis.metrics import RedisMetrics

T = TypeVar("T")

logger = logging.getLogger(__name__)

_POLL_S = 0.25
_RESYNC_S = 30.0

# Hash names under "<prefix>control:"; each field is one backend id or version.
KINDS = ("backends", "removed", "drained", "blocked", "intents", "pushes")
Entries = dict[str, dict[str, bytes]]


def _unavailable(failure: RedisFailure) -> ControlUnavailable:
    return ControlUnavailable(
        f"control state {failure.what} failed: {failure.kind}", code="control_plane_unavailable"
    )


class RedisControlStore:
    """``ControlStore`` in Redis hashes; ``start`` subscribes and reloads on every notice."""

    def __init__(
        self,
        redis: Redis,
        key_prefix: str,
        clock: Clock,
        op_timeout_s: float,
        *,
        sharded: Callable[[bytes], Callable[[], Awaitable[PubSub]]] | None = None,
        redis_metrics: RedisMetrics | None = None,
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._op_timeout_s = op_timeout_s
        self._call = RedisCall(
            op_timeout_s, _unavailable, clock=clock.monotonic, metrics=redis_metrics,
            component="control", operations=("load", "save"),
        )
        # On a cluster (``sharded``: opens a channel's sharded subscription) every hash
        # and the channel share the {control} slot, so a load or a save is one MULTI.
        self._cluster = sharded is not None
        base = f"{key_prefix}{{control}}" if self._cluster else f"{key_prefix}control"
        self._keys = {kind: f"{base}:{kind}".encode() for kind in KINDS}
        self._channel = base.encode()
        self._open_pubsub = None if sharded is None else sharded(self._channel)
        self._task: asyncio.Task[None] | None = None
        self._subscriber: Subscriber | None = None
        self._loaded = asyncio.Event()
        self._notices = 0
        self._last_sync = 0.0
        self._retry = False  # the last reload failed
        self._outage = OutageLog(logger, "control subscription")

    @property
    def subscriptions(self) -> int:
        """How many times the change channel has been (re)subscribed."""
        return 0 if self._subscriber is None else self._subscriber.subscriptions

    @property
    def notices(self) -> int:
        """Change notices heard (including this process's own)."""
        return self._notices

    async def load(self) -> ControlState:
        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                for kind in KINDS:
                    pipe.hgetall(self._keys[kind])
                return await pipe.execute()

        results = await self._call("load", read())
        return state_from_entries(
            {
                kind: {_text(k): v for k, v in fields.items()}
                for kind, fields in zip(KINDS, results, strict=True)
            }
        )

    async def save(self, before: ControlState, after: ControlState) -> None:
        old, new = state_entries(before), state_entries(after)

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                for kind in KINDS:
                    changed = {f: v for f, v in new[kind].items() if old[kind].get(f) != v}
                    gone = [f for f in old[kind] if f not in new[kind]]
                    if changed:
                        pipe.hset(self._keys[kind], mapping=changed)  # type: ignore[arg-type]
                    if gone:
                        pipe.hdel(self._keys[kind], *gone)
                if self._cluster:
                    pipe.spublish(self._channel, b"changed")
                else:
                    pipe.publish(self._channel, b"changed")
                await pipe.execute()

        await self._call("save", write())

    async def start(self, reload: Callable[[], Awaitable[None]]) -> None:
        if self._task is not None:
            return

        async def subscribed() -> None:
            self._outage.succeeded()
            await self._reload(reload)
            self._loaded.set()

        async def notices(batch: list[object]) -> None:
            # Every notice already waiting is answered by one reload.
            self._notices += len(batch)
            await self._reload(reload)

        async def quiet(now: float) -> None:
            if self._retry or now - self._last_sync >= _RESYNC_S:
                await self._reload(reload)

        self._subscriber = Subscriber(
            self._redis,
            self._channel,
            clock=self._clock,
            rng=random.Random(),
            op_timeout_s=self._op_timeout_s,
            poll_s=_POLL_S,
            on_subscribed=subscribed,
            on_messages=notices,
            on_lost=lambda why: self._outage.failed(why),
            on_quiet=quiet,
            open_pubsub=self._open_pubsub,
        )
        self._task = asyncio.create_task(self._subscriber.run(), name="control-sub")
        # Serving with only the configured backends beats not serving while Redis is
        # away; the subscriber applies the shared state as soon as it gets through.
        try:
            async with asyncio.timeout(max(1.0, 2 * self._op_timeout_s)):
                await self._loaded.wait()
        except TimeoutError:
            logger.warning("started before the shared control state could be loaded")

    async def close(self) -> None:
        await stop(self._subscriber, self._task, timeout_s=1.0 + 2 * self._op_timeout_s,
                   what="control subscription")
        self._task = None

    async def _reload(self, reload: Callable[[], Awaitable[None]]) -> None:
        try:
            await reload()
        except ControlUnavailable as exc:
            # Expected while Redis restarts or fails over: one line, no traceback, and
            # the next quiet poll tries again.
            self._retry = True
            logger.warning("control state reload failed, will retry: %s", exc.message)
            return
        self._retry = False
        self._last_sync = self._clock.monotonic()

    def __repr__(self) -> str:
        return (
            f"RedisControlStore(channel={self._channel.decode()!r}, "
            f"subscriptions={self.subscriptions}, notices={self._notices}, "
            f"running={self._task is not None})"
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def state_entries(state: ControlState) -> Entries:
    """The state as hash fields: kind -> field -> JSON value (what Redis stores)."""
    return {
        "backends": {
            b.id: orjson.dumps(
                {"region": b.region, "url": b.url, "version_source": b.version_source}
            )
            for b in state.added.values()
        },
        "removed": {bid: b"1" for bid in state.removed},
        "drained": {bid: b"1" for bid in state.drained},
        "blocked": {version: b"1" for version in state.blocked},
        "intents": {bid: orjson.dumps(v.as_dict()) for bid, v in state.intents.items()},
        "pushes": {
            bid: orjson.dumps({"version": p.version.as_dict(), "at": p.at, "id": p.push_id})
            for bid, p in state.pushes.items()
        },
    }


def state_from_entries(entries: Mapping[str, Mapping[str, bytes]]) -> ControlState:
    """Parse stored fields; an unreadable field is skipped with a warning, not fatal."""

    def ids(kind: str) -> frozenset[str]:
        return frozenset(entries.get(kind, {}))

    return ControlState(
        added=_parse_all(entries, "backends", _parse_backend),
        removed=ids("removed"),
        drained=ids("drained"),
        blocked=ids("blocked"),
        intents=_parse_all(entries, "intents", _parse_bundle),
        pushes=_parse_all(entries, "pushes", _parse_push),
    )


def _parse_all(
    entries: Mapping[str, Mapping[str, bytes]], kind: str, parse: Callable[[str, Any], T]
) -> dict[str, T]:
    out: dict[str, T] = {}
    for key, raw in entries.get(kind, {}).items():
        try:
            out[key] = parse(key, orjson.loads(raw))
        except (ValueError, TypeError, KeyError) as exc:
            # One garbled field must not hide every other operator setting.
            logger.warning("ignoring unreadable control entry %s/%s: %s", kind, key, exc)
    return out


def _parse_backend(backend_id: str, data: Any) -> Backend:
    source = data.get("version_source", "poll")
    if source not in ("poll", "push"):
        raise ValueError(f"version_source {source!r}")
    return Backend(backend_id, str(data["region"]), str(data["url"]), source)


def _parse_bundle(_key: str, data: Any) -> VersionBundle:
    if not isinstance(data, dict):
        raise TypeError("not a version object")
    try:
        return VersionBundle.from_mapping(data)
    except InvalidVersion as exc:
        raise ValueError(str(exc)) from exc


def _parse_push(key: str, data: Any) -> PushedReport:
    return PushedReport(_parse_bundle(key, data["version"]), float(data["at"]), str(data["id"]))
