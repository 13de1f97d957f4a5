"""Explicit pin changes on Redis: ``repin`` and ``unpin``, logged and broadcast.

Invariant 3: a pin changes only here. Each change writes (or deletes) the pin, appends
the session to the repin log and PUBLISHes it on the invalidation channel inside one
MULTI/EXEC, so whenever the change is applied every replica hears of it, now or when
it replays the log (redis_sync.py). On a cluster a MULTI stays in one slot: the write
goes first, then the log and the broadcast, so a replica replaying the entry reads
the new pin. The replaced pin's session leaves its version's sorted set (count_pinned).
The pin store evicts its own copy around each call (see RedisPinStore.repin).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from proxy.core.errors import StoreUnavailable
from proxy.store.redis_errors import replaced_pin
from proxy.store.redis_sync import announce
from proxy.store.redis_wire import encode_pin, member

if TYPE_CHECKING:
    from collections.abc import Callable

    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from proxy.config.store import StoreConfig
    from proxy.core.clock import Clock
    from proxy.core.models import Pin
    from proxy.redis.call import RedisCall
    from proxy.store.redis_wire import StoreKeys

_log = logging.getLogger(__name__)


class PinChanges:
    """``repin``/``unpin`` for the pin store, through its ``RedisCall``."""

    __slots__ = ("_call", "_client", "_clock", "_keys", "_log_size", "_ttl_ms")

    def __init__(self, client: Redis, keys: StoreKeys, config: StoreConfig, clock: Clock,
                 call: RedisCall, ttl_ms: int) -> None:
        self._client = client
        self._keys = keys
        self._clock = clock
        self._call = call
        self._ttl_ms = ttl_ms
        self._log_size = config.repin_log_size

    async def repin(self, session_id: str, pin: Pin) -> Pin | None:
        """Write ``pin`` whatever was there; the previous pin, if readable."""
        keys = self._keys

        def write(pipe: Pipeline) -> None:
            pipe.set(keys.pin(session_id), encode_pin(pin), px=self._ttl_ms, get=True)
            pipe.zadd(keys.pinned(pin.version_key), {member(session_id): self._clock.time()})

        results = await self._call("repin", self._change(session_id, write))
        previous = replaced_pin(session_id, results[0])
        if previous is not None and previous.version_key != pin.version_key:
            await self._uncount(session_id, previous)
        return previous

    async def unpin(self, session_id: str) -> Pin | None:
        """Delete the pin; the previous one, if readable."""
        key = self._keys.pin(session_id)
        results = await self._call("unpin", self._change(session_id, lambda p: p.getdel(key)))
        previous = replaced_pin(session_id, results[0])
        if previous is not None:
            await self._uncount(session_id, previous)
        return previous

    async def _change(self, session_id: str, write: Callable[[Pipeline], object]) -> list[Any]:
        """Apply ``write``, then log and broadcast the change (one MULTI off a cluster)."""
        if not self._keys.cluster:
            async with self._client.pipeline(transaction=True) as pipe:
                write(pipe)
                announce(pipe, self._keys, session_id, self._log_size)
                return await pipe.execute()
        async with self._client.pipeline(transaction=False) as pipe:
            write(pipe)
            results = await pipe.execute()
        async with self._client.pipeline(transaction=True) as pipe:
            announce(pipe, self._keys, session_id, self._log_size)
            await pipe.execute()
        return results

    async def _uncount(self, session_id: str, pin: Pin) -> None:
        # A repin/unpin is rare (admin, retirement): one more round trip is fine, and a
        # failure only leaves a count high until the entry ages out of the TTL window.
        try:
            await self._call(
                "uncount", self._client.zrem(self._keys.pinned(pin.version_key), member(session_id))
            )
        except StoreUnavailable as exc:
            _log.warning("pinned-session count not updated: %s", exc.message)
