"""MemoryPinStore.count_pinned stays exact through pins, repins, unpins, expiry and LRU."""

from __future__ import annotations

from proxy.config.store import StoreConfig
from proxy.core.clock import ManualClock
from proxy.core.models import Pin
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
