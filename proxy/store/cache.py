"""A bounded, expiring LRU of pins: the Redis store's process-local copy.

Pure bookkeeping with no I/O; time comes from the injected clock's monotonic reading.
An entry's expiry is fixed when it is put and is not extended by reads: the point of
the expiry is to re-read the store every so often, not to keep hot entries forever.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.clock import Clock
    from proxy.models import Pin


class PinCache:
    """At most ``size`` pins, each trusted for ``ttl_s`` seconds; least recently used goes first.

    ``size`` 0 disables the cache (nothing is ever kept). ``generation`` increases on
    every eviction by ``evict`` and every ``clear``; a caller that read a pin from the
    store passes the generation it saw before the read to ``put``, which then drops the
    pin if an invalidation happened meanwhile (the read may predate the invalidation).
    """

    def __init__(self, size: int, ttl_s: float, clock: Clock) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self._size = size
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Pin, float]] = OrderedDict()
        self._generation = 0

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
        """The cached pin if present and not expired (an expired one is dropped)."""
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        pin, expires_at = entry
        if self._clock.monotonic() >= expires_at:
            del self._entries[session_id]
            return None
        self._entries.move_to_end(session_id)
        return pin

    def put(self, session_id: str, pin: Pin, generation: int | None = None) -> bool:
        """Cache ``pin``; return False (and cache nothing) if invalidated since ``generation``."""
        if self._size == 0:
            return False
        if generation is not None and generation != self._generation:
            return False
        self._entries[session_id] = (pin, self._clock.monotonic() + self._ttl_s)
        self._entries.move_to_end(session_id)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return True

    def evict(self, session_id: str) -> None:
        """Forget the session and fence off reads that started before this call."""
        self._generation += 1
        self._entries.pop(session_id, None)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()

    def __repr__(self) -> str:
        return f"PinCache(entries={len(self._entries)}, size={self._size}, ttl_s={self._ttl_s})"
