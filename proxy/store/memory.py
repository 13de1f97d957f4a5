"""The single-process pin store: a bounded dict, for one worker, tests and the demo.

Every method runs to completion without an await, so check-and-set is atomic under
asyncio without a lock. Every access (hit, write) both moves the entry to the end of
the LRU order and sets its expiry to ``now + pin_ttl_s``; with a constant TTL and a
monotonic clock, LRU order is therefore also expiry order, and expired entries are
always at the front, where each call sweeps them off in amortised O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from proxy.store.base import Activity, Lookup

if TYPE_CHECKING:
    from proxy.config.store import StoreConfig
    from proxy.core.clock import Clock
    from proxy.core.models import Pin
    from proxy.store.base import Propose


class MemoryPinStore:
    """``PinStore`` over a dict: LRU-bounded by ``max_sessions``, TTL sliding on every hit."""

    def __init__(self, config: StoreConfig, clock: Clock) -> None:
        self._max_sessions = config.max_sessions
        self._ttl_s = config.pin_ttl_s
        self._clock = clock
        self._pins: OrderedDict[str, tuple[Pin, float]] = OrderedDict()
        # Per version key, its sessions -> expiry in the same LRU order, kept in step
        # with every insert and removal: count_pinned is O(1) however many sessions
        # there are, and ``activity`` reads only the sessions inside its window.
        self._by_version: dict[str, OrderedDict[str, float]] = {}
        self._closed = False

    def __len__(self) -> int:
        self._sweep(self._clock.monotonic())
        return len(self._pins)

    async def get(self, session_id: str) -> Pin | None:
        now = self._sweep(self._clock.monotonic())
        entry = self._pins.get(session_id)
        if entry is None:
            return None
        self._store(session_id, entry[0], now)
        return entry[0]

    async def lookup(
        self, session_id: str, hint: Pin | None = None, propose: Propose | None = None
    ) -> Lookup:
        # One process, one dict: nothing else can lose, replace or re-assert a pin. A
        # proposal would save no round trip here: pin_if_absent does the same.
        pin = await self.get(session_id)
        if pin is None and hint is not None:
            pin = await self.pin_if_absent(session_id, hint)
        return Lookup(pin)

    async def pin_if_absent(self, session_id: str, pin: Pin) -> Pin:
        now = self._sweep(self._clock.monotonic())
        entry = self._pins.get(session_id)
        winner = pin if entry is None else entry[0]
        self._store(session_id, winner, now)
        return winner

    async def repin(self, session_id: str, pin: Pin) -> Pin | None:
        now = self._sweep(self._clock.monotonic())
        entry = self._pins.get(session_id)
        self._store(session_id, pin, now)
        return None if entry is None else entry[0]

    async def unpin(self, session_id: str) -> Pin | None:
        self._sweep(self._clock.monotonic())
        entry = self._pins.pop(session_id, None)
        if entry is None:
            return None
        self._uncount(session_id, entry[0])
        return entry[0]

    async def count_pinned(self, version_key: str) -> int:
        self._sweep(self._clock.monotonic())
        return len(self._by_version.get(version_key, ()))

    async def activity(self, version_key: str, window_s: float) -> Activity:
        now = self._sweep(self._clock.monotonic())
        sessions = self._by_version.get(version_key)
        if not sessions:
            return Activity(active=0, last_used_at=None)
        # An entry's expiry is its last use + the TTL, and the dict is in use order,
        # so the active ones are a suffix: walk back from the newest.
        active_after = now - window_s + self._ttl_s
        active = 0
        for expiry in reversed(sessions.values()):
            if expiry <= active_after:
                break
            active += 1
        newest = next(reversed(sessions.values()))
        last_used = self._clock.time() - (now - (newest - self._ttl_s))
        return Activity(active=active, last_used_at=last_used)

    async def ping(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._closed = True

    def _store(self, session_id: str, pin: Pin, now: float) -> None:
        previous = self._pins.get(session_id)
        if previous is not None and previous[0].version_key != pin.version_key:
            self._uncount(session_id, previous[0])
        expiry = now + self._ttl_s
        self._pins[session_id] = (pin, expiry)
        self._pins.move_to_end(session_id)
        sessions = self._by_version.setdefault(pin.version_key, OrderedDict())
        sessions[session_id] = expiry
        sessions.move_to_end(session_id)
        while len(self._pins) > self._max_sessions:
            evicted, (old, _expiry) = self._pins.popitem(last=False)
            self._uncount(evicted, old)

    def _uncount(self, session_id: str, pin: Pin) -> None:
        sessions = self._by_version.get(pin.version_key)
        if sessions is None:
            return
        sessions.pop(session_id, None)
        if not sessions:
            del self._by_version[pin.version_key]

    def _sweep(self, now: float) -> float:
        pins = self._pins
        while pins:
            first = next(iter(pins.values()))
            if first[1] > now:
                break
            expired, (pin, _expiry) = pins.popitem(last=False)
            self._uncount(expired, pin)
        return now

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (
            f"MemoryPinStore(sessions={len(self._pins)}, max_sessions={self._max_sessions}, "
            f"pin_ttl_s={self._ttl_s}{state})"
        )
