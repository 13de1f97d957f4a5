"""A bounded, expiring LRU of pins: the Redis store's process-local copy.

Pure bookkeeping with no I/O; time comes from the injected clock's monotonic reading.
An entry's expiry is fixed when it is put and is not extended by reads: the point of
the expiry is to re-read the store every so often, not to keep hot entries forever.

With ``idle_s`` set, an entry whose expiry has passed is not forgotten: it is kept,
as a copy that is no longer verified, for as long as its session keeps being used
within ``idle_s`` (the pin's TTL in the store). ``stale`` returns such a copy; the
store serves it while it cannot reach Redis, because a pin only changes by an
explicit repin, which a reconnecting replica replays. ``held`` lists the pins used
within ``idle_s``: what a replica re-asserts when the store lost its data. A session
idle for longer than ``idle_s`` has expired in the store too, and is dropped here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.core.clock import Clock
    from proxy.core.models import Pin

# How many recent evictions the cache remembers by session (see PinCache.put). A read
# that began before the oldest remembered one is fenced whatever its session: past the
# bound the cache cannot tell whose eviction it forgot, so it assumes the worst.
_EVICTIONS_KEPT = 4096


class _Entry:
    __slots__ = ("last_used", "pin", "verified_until")

    def __init__(self, pin: Pin, verified_until: float, last_used: float) -> None:
        self.pin = pin
        self.verified_until = verified_until
        self.last_used = last_used


class PinCache:
    """At most ``size`` pins, each trusted for ``ttl_s`` seconds; least recently used goes first.

    ``size`` 0 disables the cache (nothing is ever kept). ``generation`` increases on
    every eviction by ``evict`` and every ``clear``; a caller that read a pin from the
    store passes the generation it saw before the read to ``put``, which then drops the
    pin if that session was evicted, or the cache cleared, meanwhile (the read may
    predate the invalidation). Another session's eviction fences nothing: under
    concurrent load every new session's miss evicts, and a global fence then kept
    almost every read pin out of the cache, so hits went to Redis.
    ``idle_s``: keep expired entries as stale copies while used within this long
    (None: an expired entry is dropped when read).
    """

    def __init__(
        self, size: int, ttl_s: float, clock: Clock, *, idle_s: float | None = None
    ) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        if idle_s is not None and idle_s <= 0:
            raise ValueError("idle_s must be > 0")
        self._size = size
        self._ttl_s = ttl_s
        self._idle_s = idle_s
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._generation = 0
        self._cleared_at = 0  # the generation the last clear() made
        # session -> generation its last eviction made, oldest first, bounded.
        self._evicted: OrderedDict[str, int] = OrderedDict()
        self._forgotten_upto = 0  # evictions up to this generation are no longer known

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._entries

    def get(self, session_id: str) -> Pin | None:
        """The cached pin if present and not expired (an expired one is dropped,
        or kept as a stale copy when ``idle_s`` is set)."""
        entry = self._used(session_id, verified=True)
        return None if entry is None else entry.pin

    def stale(self, session_id: str) -> Pin | None:
        """The cached pin even if expired, while its session was used within ``idle_s``."""
        entry = self._used(session_id, verified=False)
        return None if entry is None else entry.pin

    def put(
        self,
        session_id: str,
        pin: Pin,
        generation: int | None = None,
        *,
        idle_for_s: float = 0.0,
    ) -> bool:
        """Cache ``pin``; return False (and cache nothing) if invalidated since ``generation``.

        ``idle_for_s``: how long ago the session was last used (0: now).
        """
        if self._size == 0:
            return False
        if generation is not None and self._fenced(session_id, generation):
            return False
        now = self._clock.monotonic()
        self._entries[session_id] = _Entry(pin, now + self._ttl_s, now - idle_for_s)
        self._entries.move_to_end(session_id)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return True

    def held(self) -> list[tuple[str, Pin, float]]:
        """(session, pin, seconds since last use) of every session used within ``idle_s``,
        most recently used first; with ``idle_s`` None, only unexpired entries."""
        now = self._clock.monotonic()
        out = []
        for session_id, entry in reversed(self._entries.items()):
            if self._alive(entry, now, verified=self._idle_s is None):
                out.append((session_id, entry.pin, now - entry.last_used))
        return out

    def evict(self, session_id: str) -> None:
        """Forget the session and fence off its reads that started before this call."""
        self._generation += 1
        self._entries.pop(session_id, None)
        evicted = self._evicted
        evicted[session_id] = self._generation
        evicted.move_to_end(session_id)
        if len(evicted) > _EVICTIONS_KEPT:
            self._forgotten_upto = evicted.popitem(last=False)[1]

    def clear(self) -> None:
        """Forget every session and fence off every read that started before this call."""
        self._generation += 1
        self._cleared_at = self._generation
        self._entries.clear()
        self._evicted.clear()  # the clear fences everything they would have

    def _fenced(self, session_id: str, generation: int) -> bool:
        """An invalidation of ``session_id`` may have happened since ``generation``."""
        if generation == self._generation:
            return False
        if generation < self._cleared_at or generation < self._forgotten_upto:
            return True
        evicted_at = self._evicted.get(session_id)
        return evicted_at is not None and evicted_at > generation

    def _used(self, session_id: str, *, verified: bool) -> _Entry | None:
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        now = self._clock.monotonic()
        if not self._alive(entry, now, verified=False):
            del self._entries[session_id]
            return None
        if verified and now >= entry.verified_until:
            return None
        entry.last_used = now
        self._entries.move_to_end(session_id)
        return entry

    def _alive(self, entry: _Entry, now: float, *, verified: bool) -> bool:
        """Still worth keeping: unexpired, or (with ``idle_s``) used recently enough."""
        if verified or self._idle_s is None:
            return now < entry.verified_until
        return now - entry.last_used < self._idle_s

    def __repr__(self) -> str:
        return f"PinCache(entries={len(self._entries)}, size={self._size}, ttl_s={self._ttl_s})"
