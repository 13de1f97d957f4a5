"""Batched TTL refreshes for cache hits, and the pinned-session counts they carry.

Why touches are batched: invariant "a cached pin costs no network round trip". A cache
hit still has to slide the pin's TTL in Redis, so it only records the session in a
pending set; a background task sends the refreshes every ``touch_interval_s`` as
pipelined PEXPIREs. A PEXPIRE that finds no key means the pin expired or was deleted
behind our back, so the local copy goes too, unless the same pipeline's read of the
epoch key says the store lost its data: then the pin is re-asserted instead (see
redis_sync.py). With nothing to refresh, the epoch is still read every interval, so a
FLUSHALL is noticed within ``touch_interval_s`` even by an idle replica.

Why pinned sessions are counted in sorted sets: operators ask "how many sessions are
pinned to v47" (rollback, the fleet view) and the answer must not scan every pin.
Each version key has a sorted set ``<prefix>pinned:<version key>`` of session id ->
wall-clock time of last use. The batched touches above already carry every use, so
the same pipeline ZADDs the session (and trims entries older than the pin TTL; a use
read from Redis, whose GETEX slid the TTL already, is ZADDed alone in the next batch); a
count is a ZCOUNT over the TTL window. It lags by up to ``touch_interval_s`` for
sessions used on other replicas, and a repin or unpin moves or removes the entry.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from proxy.core.errors import StoreUnavailable
from proxy.core.outage import OutageLog
from proxy.store.redis_wire import member

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

    from redis.asyncio import Redis

    from proxy.config.store import StoreConfig
    from proxy.core.clock import Clock
    from proxy.store.cache import PinCache
    from proxy.store.redis_sync import Caller
    from proxy.store.redis_wire import StoreKeys

_log = logging.getLogger(__name__)

_TOUCH_CHUNK = 500


class Touches:
    """Sessions used since the last batch, flushed as pipelined PEXPIRE + ZADD."""

    def __init__(
        self,
        client: Redis,
        keys: StoreKeys,
        cache: PinCache,
        config: StoreConfig,
        clock: Clock,
        call: Caller,
        *,
        epoch_ok: Callable[[object], bool],
        periodic: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self._keys = keys
        self._cache = cache
        self._config = config
        self._clock = clock
        self._call = call
        self._epoch_ok = epoch_ok  # False: the store lost data (and recovery has begun)
        self._periodic = periodic  # more checks every interval (a cluster's run ids)
        self._ttl_ms = max(1, round(config.pin_ttl_s * 1000))
        self._pending: dict[str, str] = {}  # session -> its pinned version key
        # Sessions read from Redis (GETEX already slid their TTL): only their use is
        # still to record in the per-version sorted sets.
        self._used: dict[str, str] = {}
        self._outage = OutageLog(_log, "TTL touches")

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, session_id: str, version_key: str) -> None:
        self._pending[session_id] = version_key

    def used(self, session_id: str, version_key: str) -> None:
        """Record a use whose TTL was already slid (a cache miss): ZADD only."""
        if session_id not in self._pending:
            self._used[session_id] = version_key

    def drop(self, session_id: str) -> None:
        # A pending use would re-add the session under the version it just left.
        self._pending.pop(session_id, None)
        self._used.pop(session_id, None)

    async def flush(self) -> None:
        """Send the pending TTL refreshes now; evict local copies whose key is gone."""
        await self._flush_used()
        if not self._pending:
            return
        touched = list(self._pending.items())
        self._pending = {}
        for start in range(0, len(touched), _TOUCH_CHUNK):
            chunk = touched[start : start + _TOUCH_CHUNK]
            alive, epoch = await self._call("touch", self._pexpire_all(chunk))
            if not self._epoch_ok(epoch):
                return
            gone = [
                (sid, version)
                for (sid, version), exists in zip(chunk, alive, strict=True)
                if not exists
            ]
            for session_id, _version in gone:
                self._cache.evict(session_id)
            if gone:
                # The pin expired or was deleted behind our back: not pinned any more.
                await self._call("touch", self._zrem_all(gone))

    async def run(self, closed: Callable[[], bool]) -> None:
        """Flush every ``touch_interval_s`` until ``closed()``; read the epoch when idle."""
        while not closed():
            await asyncio.sleep(self._config.touch_interval_s)
            try:
                if self._pending:
                    await self.flush()
                else:
                    await self._flush_used()
                    self._epoch_ok(await self._call("epoch", self._client.get(self._keys.epoch)))
                if self._periodic is not None:
                    await self._periodic()
                self._outage.succeeded()
            except StoreUnavailable as exc:
                # Losing one batch only shortens TTLs that are normally hours long; the
                # next hit of each session schedules its touch again.
                self._outage.failed(f"batches dropped: {exc.message}")
            except Exception:
                _log.exception("TTL touch batch failed unexpectedly")

    async def _pexpire_all(self, touched: Sequence[tuple[str, str]]) -> tuple[list[Any], object]:
        now = self._clock.time()
        by_version: dict[str, dict[bytes, float]] = {}
        keys = self._keys
        async with self._client.pipeline(transaction=False) as pipe:
            for session_id, version_key in touched:
                pipe.pexpire(keys.pin(session_id), self._ttl_ms)
                by_version.setdefault(version_key, {})[member(session_id)] = now
            for version_key, members in by_version.items():
                pinned = keys.pinned(version_key)
                pipe.zadd(pinned, members)
                # Entries unused for a whole TTL belong to pins that have expired.
                pipe.zremrangebyscore(pinned, "-inf", now - self._config.pin_ttl_s)
                pipe.pexpire(pinned, self._ttl_ms)
            pipe.get(keys.epoch)
            results = await pipe.execute()
        return results[: len(touched)], results[-1]

    async def _flush_used(self) -> None:
        if self._used:
            used, self._used = self._used, {}
            await self._call("touch", self._zadd_all(used))

    async def _zadd_all(self, used: Mapping[str, str]) -> list[Any]:
        now = self._clock.time()
        by_version: dict[str, dict[bytes, float]] = {}
        for session_id, version_key in used.items():
            by_version.setdefault(version_key, {})[member(session_id)] = now
        async with self._client.pipeline(transaction=False) as pipe:
            for version_key, members in by_version.items():
                pipe.zadd(self._keys.pinned(version_key), members)
                pipe.pexpire(self._keys.pinned(version_key), self._ttl_ms)
            return await pipe.execute()

    async def _zrem_all(self, gone: Iterable[tuple[str, str]]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for session_id, version_key in gone:
                pipe.zrem(self._keys.pinned(version_key), member(session_id))
            return await pipe.execute()
