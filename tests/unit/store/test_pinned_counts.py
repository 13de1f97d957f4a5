"""MemoryPinStore.count_pinned stays exact through pins, repins, unpins, expiry and LRU."""

from __future__ import annotations

from proxy.config.store import StoreConfig
from proxy.core.clock import ManualClock
from proxy.core.models import Pin
from proxy.store.base import Activity
from proxy.store.memory import MemoryPinStore

K1, K2 = "prompt=v1", "prompt=v2"


def pin(key: str) -> Pin:
    return Pin(key, "b", "r", 0.0)


async def counts(store: MemoryPinStore) -> tuple[int, int]:
    return await store.count_pinned(K1), await store.count_pinned(K2)


async def test_counts_follow_every_change() -> None:
    clock = ManualClock()
    store = MemoryPinStore(StoreConfig(pin_ttl_s=100, max_sessions=3), clock)
    assert await counts(store) == (0, 0)
    await store.pin_if_absent("s1", pin(K1))
    await store.pin_if_absent("s2", pin(K1))
    await store.pin_if_absent("s1", pin(K2))  # loses: s1 stays on K1
    await store.get("s1")
    assert await counts(store) == (2, 0)
    await store.repin("s1", pin(K2))
    assert await counts(store) == (1, 1)
    await store.repin("s1", pin(K2))  # same version again: no double count
    assert await counts(store) == (1, 1)
    await store.repin("s3", pin(K2))  # a repin of an unpinned session pins it
    assert await counts(store) == (1, 2)
    await store.unpin("s3")
    await store.unpin("never")
    assert await counts(store) == (1, 1)
    await store.pin_if_absent("s4", pin(K1))
    await store.pin_if_absent("s5", pin(K1))  # over max_sessions: LRU s2 goes
    assert len(store) == 3
    assert await counts(store) == (2, 1)
    clock.advance(50)
    await store.get("s5")
    clock.advance(60)  # s1 and s4 expired; s5 was used 60 s ago
    assert await counts(store) == (1, 0)
    clock.advance(100)
    assert await counts(store) == (0, 0)


async def test_activity_counts_sessions_used_within_the_window_and_the_last_expiry() -> None:
    clock = ManualClock()
    store = MemoryPinStore(StoreConfig(pin_ttl_s=100), clock)
    assert await store.activity(K1, 30) == Activity(active=0, last_used_at=None)
    await store.pin_if_absent("old", pin(K1))
    clock.advance(40)
    await store.pin_if_absent("recent", pin(K1))
    await store.pin_if_absent("other", pin(K2))
    clock.advance(10)
    await store.get("recent")  # used again: its last use moves on
    found = await store.activity(K1, 30)
    assert found.active == 1  # "old" was last used 50 s ago, outside the 30 s window
    assert found.last_used_at == clock.time()
    assert (await store.activity(K1, 60)).active == 2
    await store.repin("recent", pin(K2))  # moved away: no longer K1's
    found = await store.activity(K1, 60)
    assert (found.active, found.last_used_at) == (1, clock.time() - 50)
    clock.advance(51)  # "old" expires (100 s after its last use)
    assert await store.activity(K1, 1000) == Activity(active=0, last_used_at=None)
    assert (await store.activity(K2, 1000)).active == 2
