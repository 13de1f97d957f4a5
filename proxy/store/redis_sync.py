"""Keeping a replica's pin cache true across disconnections and store data loss.

Theory of operation
-------------------
Pins change only by an explicit repin or unpin, so a replica's cached copies stay
valid while it cannot hear the invalidation broadcast, provided it learns, when it
reconnects, every change made meanwhile. The broadcast alone cannot tell it that
(pub/sub keeps nothing), so every repin and unpin is also appended to a capped stream,
``<prefix>repins``, in the same transaction that writes the pin and publishes. A
replica remembers its position in that log (``LogPosition``: the stream's
``entries-added`` counter and the newest id it has applied) and, on every
(re)subscription and after hearing invalidations, reads everything past it in one
MULTI: evicting those sessions applies each change it might have missed. When more
entries were added than the stream still holds, some were trimmed unseen: the replica
drops its whole cache instead (Redis 7.0's XTRIM does not move
``max-deleted-entry-id``, so the test compares ``entries-added`` with ``length``).

The store losing data (a restart with an empty dataset, a failover to a replica that
missed writes, FLUSHALL, eviction) is detected by the epoch key: a token each replica
writes with SET NX at start and adopts; it vanishing or changing means the keys
written before it are gone. A changed server ``run_id`` after a reconnection counts
too (a failover or a restart from an AOF that lost its last second of writes keeps
the epoch but not necessarily every pin), and so does the log's ``entries-added``
going backwards. On detection the replica writes back every pin it holds that was
used within ``pin_ttl_s`` with pin-if-absent, most recently used first, pipelined,
at most ``reassert_per_s`` a second, each with the TTL it had left.

The rule for a conflict: the stored pin wins. Whatever the store holds when a
re-assertion arrives was written first, and may already have been answered by
another replica; the re-asserting replica never overwrites it, so any number of
replicas converge on one pin without coordinating, exactly as racing new-session
pins do. A conflict is counted and audited (``on_conflict``), and the losing version
is left in ``<prefix>changed:<session>`` with an invalidation, so whichever replica
serves the session next reads it (once) and marks that answer
``X-Prompt-Version-Changed: <old> -> <new>``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from redis.exceptions import ResponseError

from proxy.core.errors import StoreUnavailable
from proxy.store.redis_wire import decode_pin, encode_pin, member

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from proxy.config.store import StoreConfig
    from proxy.core.clock import Clock
    from proxy.core.models import Pin
    from proxy.store.cache import PinCache
    from proxy.store.redis_wire import StoreKeys

    ConflictHook = Callable[[str, Pin, Pin], None]  # (session, ours, the stored winner)

T = TypeVar("T")

_log = logging.getLogger(__name__)

_FIELD = b"s"  # the one field of a log entry: the session id
_CHUNK = 500  # pins per re-assertion pipeline
_RETRY_S = 0.2


class Caller(Protocol):
    """The store's bounded call: a Redis operation, its errors as ``StoreUnavailable``."""

    async def __call__(self, what: str, operation: Awaitable[T]) -> T: ...


@dataclass(frozen=True, slots=True)
class LogPosition:
    """How far a replica has applied the repin log."""

    added: int  # the stream's entries-added when ``last_id`` was its newest entry
    last_id: bytes | None  # None: the log did not exist


@dataclass(frozen=True, slots=True)
class LogStep:
    """What reading the log tells a replica to do."""

    position: LogPosition  # where it stands afterwards
    evict: tuple[str, ...] = ()  # sessions repinned or unpinned since its last position
    clear: bool = False  # entries were trimmed before it saw them: drop every copy
    regressed: bool = False  # the log lost entries: the store lost data


def log_position(info: object) -> tuple[LogPosition, int]:
    """The log's position and length from an XINFO STREAM reply (an error: no log)."""
    if not isinstance(info, dict):
        return LogPosition(0, None), 0
    last = info.get("last-generated-id")
    return (
        LogPosition(int(info.get("entries-added", 0)), last if isinstance(last, bytes) else None),
        int(info.get("length", 0)),
    )


def next_step(
    known: LogPosition | None,
    now: LogPosition,
    length: int,
    entries: Sequence[tuple[bytes, dict[bytes, bytes]]],
) -> LogStep:
    """Pure: from the position a replica knew and what the log holds now, what to apply.

    ``entries``: the log's entries after ``known.last_id``, read in the same
    transaction as ``now`` and ``length``.
    """
    if known is None:
        return LogStep(now)  # the first reading is the baseline: the cache is empty
    if now.added < known.added:
        return LogStep(now, regressed=True)
    missed = now.added - known.added
    if missed == 0:
        return LogStep(now)
    if missed > length or len(entries) < missed:
        return LogStep(now, clear=True)
    sessions = []
    for _entry_id, fields in entries:
        raw = fields.get(_FIELD)
        if not isinstance(raw, bytes):
            return LogStep(now, clear=True)  # not ours: be safe
        sessions.append(raw.decode("utf-8", "surrogatepass"))
    return LogStep(now, evict=tuple(sessions))


def log_entry(session_id: str) -> dict[bytes, bytes]:
    """The fields of a repin-log entry for ``session_id``."""
    return {_FIELD: member(session_id)}


def announce(pipe: Pipeline, keys: StoreKeys, session_id: str, log_size: int) -> None:
    """Log and broadcast a change of the session's pin (in the caller's MULTI).

    On a cluster the log and the channel share the ``{sync}`` slot and the channel is
    sharded (SPUBLISH), so this MULTI stays in one slot.
    """
    pipe.xadd(keys.log, log_entry(session_id),  # type: ignore[arg-type]
              maxlen=log_size, approximate=True)
    if keys.cluster:
        pipe.spublish(keys.channel, member(session_id))
    else:
        pipe.publish(keys.channel, member(session_id))


class PinSync:
    """Replays the repin log into the cache and re-asserts pins when the store lost data."""

    def __init__(
        self,
        client: Redis,
        keys: StoreKeys,
        cache: PinCache,
        config: StoreConfig,
        clock: Clock,
        call: Caller,
        *,
        on_conflict: ConflictHook,
    ) -> None:
        self._client = client
        self._keys = keys
        self._cache = cache
        self._config = config
        self._clock = clock
        self._call = call
        self._on_conflict = on_conflict
        self._ttl_ms = max(1, round(config.pin_ttl_s * 1000))
        self._epoch: bytes | None = None
        self._servers: frozenset[str] | None = None  # run ids of the primaries
        self._position: LogPosition | None = None
        self._lost_at = -math.inf
        self._recovery: asyncio.Task[None] | None = None
        self._again = False
        self.stale = False  # invalidations heard since the log was last read
        self.losses = 0  # times this replica saw the store lose data
        self.reasserted = 0  # pins written back after a loss
        self.conflicts = 0  # re-assertions that found another pin in place

    @property
    def epoch(self) -> bytes | None:
        return self._epoch

    @property
    def recovering(self) -> bool:
        return self._recovery is not None and not self._recovery.done()

    def lost_data_s_ago(self) -> float:
        return self._clock.monotonic() - self._lost_at

    async def catch_up(self, *, check_server: bool = False, detect: bool = True) -> None:
        """Apply the log since the last position; check the epoch (and the run id).

        ``detect`` False: only adopt the epoch and the position (while recovering).
        """
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xinfo_stream(self._keys.log)
            start = b"-" if self._position is None or self._position.last_id is None else (
                b"(" + self._position.last_id
            )
            pipe.xrange(self._keys.log, start, b"+")
            # A fresh token each time: one that reappears would hide the loss it marks.
            token = secrets.token_hex(8).encode()
            pipe.set(self._keys.epoch, token, nx=True, get=True)
            replies = await self._call("sync", pipe.execute(raise_on_error=False))
        for reply in replies[1:]:
            if isinstance(reply, Exception):
                raise StoreUnavailable(f"pin store sync failed: {reply}") from reply
        if isinstance(replies[0], ResponseError) and "no such key" not in str(replies[0]):
            raise StoreUnavailable(f"pin store sync failed: {replies[0]}") from replies[0]
        position, length = log_position(replies[0])
        step = next_step(self._position, position, length, replies[1] or [])
        self.stale = False
        epoch = token if replies[2] is None else bytes(replies[2])
        reasons = []
        if self._epoch is not None and epoch != self._epoch:
            reasons.append("the epoch key was gone" if replies[2] is None else "a new epoch")
        if step.regressed:
            reasons.append("the repin log went backwards")
        if check_server and await self._new_server():
            reasons.append("a different server run id")
        self._epoch = epoch
        self._position = step.position
        for session_id in step.evict:
            self._cache.evict(session_id)
        if step.clear and not reasons:
            _log.warning("repin log trimmed past this replica's position: pin cache dropped")
            self._cache.clear()
        if reasons and detect:
            self.data_lost(", ".join(reasons))

    async def watch_servers(self) -> None:
        """Check the primaries' run ids (a cluster, where one shard can fail over
        without breaking this replica's subscription on another)."""
        if await self._new_server():
            self.data_lost("a different server run id")

    async def _new_server(self) -> bool:
        """Whether a primary answers that was not there before (a failover or restart)."""
        if self._keys.cluster:
            replies = await self._call(
                "sync", self._client.info("server", target_nodes="primaries")
            )
            infos = list(replies.values()) if isinstance(replies, dict) else []
            if infos and not isinstance(infos[0], dict):
                infos = [replies]  # one primary: redis-py answers with its info alone
        else:
            infos = [await self._call("sync", self._client.info("server"))]
        seen = frozenset(run_id for info in infos if (run_id := _run_id(info)) is not None)
        known, self._servers = self._servers, seen
        return known is not None and bool(seen - known)

    def epoch_seen(self, value: object) -> bool:
        """The epoch as read by another call (a touch batch, a cache miss); False (and
        recovery begun) when it shows the store lost data since the last sync."""
        if self._epoch is not None and value != self._epoch:
            self.data_lost("the epoch key was gone" if value is None else "a new epoch")
            return False
        return not self.recovering

    def data_lost(self, reason: str) -> None:
        """The store lost data: re-assert the held pins (in the background)."""
        self._lost_at = self._clock.monotonic()
        # Adopt whatever epoch the next sync finds (or writes): it is the new baseline.
        self._epoch = None
        if self.recovering:
            self._again = True
            return
        self.losses += 1
        _log.warning(
            "the pin store lost data (%s): re-asserting %d held pins", reason, len(self._cache)
        )
        self._recovery = asyncio.create_task(self._recover(), name="pinstore-reassert")

    async def close(self) -> None:
        task, self._recovery = self._recovery, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=1.0)

    async def _recover(self) -> None:
        while True:
            self._again = False
            try:
                # check_server: adopt the primaries' run ids too, so the restart that
                # caused this loss is not detected (and re-asserted) a second time when
                # the subscription reconnects.
                await self.catch_up(check_server=True, detect=False)
                await self._reassert()
            except StoreUnavailable as exc:
                _log.warning("re-asserting pins interrupted, will retry: %s", exc.message)
                self._again = True
                await asyncio.sleep(_RETRY_S)
            if not self._again:
                return

    async def _reassert(self) -> None:
        held = self._cache.held()
        per_s = self._config.reassert_per_s
        chunk_size = min(_CHUNK, per_s)
        for start in range(0, len(held), chunk_size):
            started = self._clock.monotonic()
            chunk = held[start : start + chunk_size]
            await self._reassert_chunk(chunk)
            # Bounded rate: a replica holding a million pins must not freeze Redis.
            pause = len(chunk) / per_s - (self._clock.monotonic() - started)
            if pause > 0:
                await asyncio.sleep(pause)

    async def _reassert_chunk(self, chunk: Sequence[tuple[str, Pin, float]]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for session_id, pin, idle_s in chunk:
                left_ms = max(1, self._ttl_ms - round(idle_s * 1000))
                pipe.set(self._keys.pin(session_id), encode_pin(pin), px=left_ms, nx=True, get=True)
            replies = await self._call("reassert", pipe.execute())
        now = self._clock.time()
        written: list[tuple[str, Pin, float]] = []
        conflicts: list[tuple[str, Pin, Pin]] = []
        for (session_id, pin, idle_s), raw in zip(chunk, replies, strict=True):
            if raw is None:
                written.append((session_id, pin, now - idle_s))
                continue
            try:
                stored = decode_pin(raw)
            except ValueError:
                continue  # a garbled pin is refused when read; nothing to re-assert over
            if stored.version_key != pin.version_key:
                conflicts.append((session_id, pin, stored))
        self.reasserted += len(written)
        if written or conflicts:
            await self._call("reassert", self._record(written, conflicts))
        if conflicts:
            # Only once every mark is written: a replica evicting on this broadcast reads it.
            await self._call("reassert", self._announce(conflicts))
        for session_id, ours, stored in conflicts:
            # Not cached: the next lookup reads the pin with its conflict mark.
            self._cache.evict(session_id)
            self.conflicts += 1
            self._on_conflict(session_id, ours, stored)

    async def _record(
        self, written: Sequence[tuple[str, Pin, float]], conflicts: Sequence[tuple[str, Pin, Pin]]
    ) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for session_id, pin, used_at in written:
                pipe.zadd(self._keys.pinned(pin.version_key), {member(session_id): used_at})
            for session_id, ours, _stored in conflicts:
                pipe.set(self._keys.changed(session_id), ours.version_key.encode(),
                         px=self._ttl_ms)
            return await pipe.execute()

    async def _announce(self, conflicts: Sequence[tuple[str, Pin, Pin]]) -> list[Any]:
        async with self._client.pipeline(transaction=True) as pipe:
            for session_id, _ours, _stored in conflicts:
                announce(pipe, self._keys, session_id, self._config.repin_log_size)
            return await pipe.execute()

    def __repr__(self) -> str:
        return (
            f"PinSync(position={self._position}, losses={self.losses}, "
            f"reasserted={self.reasserted}, conflicts={self.conflicts})"
        )


def _run_id(info: object) -> str | None:
    if isinstance(info, dict):
        value = info.get("run_id")
        return str(value) if value is not None else None
    return None
