from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.clock import ManualClock
from proxy.core.models import Pin
from proxy.store.cache import PinCache


def pin(n: int) -> Pin:
    return Pin(version_key=f"prompt=v{n}", backend_id=f"b{n}", region="eu", pinned_at=float(n))


def test_get_returns_what_was_put() -> None:
    cache = PinCache(10, 60.0, ManualClock())
    assert cache.put("s", pin(1)) is True
    assert cache.get("s") == pin(1)
    assert cache.get("other") is None
    assert len(cache) == 1


def test_entry_expires_after_ttl_and_reads_do_not_extend_it() -> None:
    clock = ManualClock()
    cache = PinCache(10, 60.0, clock)
    cache.put("s", pin(1))
    clock.advance(59.9)
    assert cache.get("s") == pin(1)
    clock.advance(0.1)
    assert cache.get("s") is None
    assert len(cache) == 0


def test_least_recently_used_is_evicted_first() -> None:
    cache = PinCache(2, 60.0, ManualClock())
    cache.put("a", pin(1))
    cache.put("b", pin(2))
    assert cache.get("a") == pin(1)  # now b is the least recently used
    cache.put("c", pin(3))
    assert "b" not in cache
    assert cache.get("a") == pin(1)
    assert cache.get("c") == pin(3)


def test_size_zero_disables_the_cache() -> None:
    cache = PinCache(0, 60.0, ManualClock())
    assert cache.put("s", pin(1)) is False
    assert cache.get("s") is None
    assert len(cache) == 0


def test_put_is_fenced_by_an_invalidation_since_the_read() -> None:
    cache = PinCache(10, 60.0, ManualClock())
    seen = cache.generation
    cache.evict("s")  # an invalidation arrives while the read is in flight
    assert cache.put("s", pin(1), seen) is False
    assert cache.get("s") is None
    assert cache.put("s", pin(1), cache.generation) is True


def test_another_sessions_eviction_does_not_fence_a_read() -> None:
    # Under load every new session's miss evicts; the pins read meanwhile must still be
    # cached, or every later request of those sessions goes to the store.
    cache = PinCache(10, 60.0, ManualClock())
    seen = cache.generation
    cache.evict("other")
    assert cache.put("s", pin(1), seen) is True
    assert cache.get("s") == pin(1)
    assert cache.put("other", pin(2), seen) is False


def test_an_eviction_before_the_read_does_not_fence_it() -> None:
    cache = PinCache(10, 60.0, ManualClock())
    cache.evict("s")
    seen = cache.generation
    cache.evict("other")
    assert cache.put("s", pin(1), seen) is True


def test_reads_older_than_the_remembered_evictions_are_fenced() -> None:
    # Past the bound the cache no longer knows whose eviction it forgot: it refuses.
    cache = PinCache(10, 60.0, ManualClock())
    seen = cache.generation
    cache.evict("s")
    for i in range(5000):
        cache.evict(f"other-{i}")
    assert cache.put("s", pin(1), seen) is False
    assert cache.put("unrelated", pin(1), seen) is False
    recent = cache.generation
    cache.evict("other-x")
    assert cache.put("unrelated", pin(1), recent) is True


def test_clear_drops_everything_and_fences_reads() -> None:
    cache = PinCache(10, 60.0, ManualClock())
    cache.put("a", pin(1))
    seen = cache.generation
    cache.clear()
    assert len(cache) == 0
    assert cache.put("b", pin(2), seen) is False


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="size"):
        PinCache(-1, 1.0, ManualClock())
    with pytest.raises(ValueError, match="ttl_s"):
        PinCache(1, 0.0, ManualClock())


ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 8), st.integers(0, 100)),
        st.tuples(st.just("get"), st.integers(0, 8), st.just(0)),
        st.tuples(st.just("evict"), st.integers(0, 8), st.just(0)),
        st.tuples(st.just("advance"), st.just(0), st.integers(0, 30)),
    ),
    max_size=80,
)


@given(size=st.integers(0, 5), ttl=st.integers(1, 50), script=ops)
def test_behaves_like_a_reference_lru(
    size: int, ttl: int, script: list[tuple[str, int, int]]
) -> None:
    clock = ManualClock()
    cache = PinCache(size, float(ttl), clock)
    model: OrderedDict[str, tuple[Pin, float]] = OrderedDict()
    for op, key_n, arg in script:
        key = f"s{key_n}"
        if op == "put":
            cache.put(key, pin(arg))
            if size:
                model[key] = (pin(arg), clock.monotonic() + ttl)
                model.move_to_end(key)
                while len(model) > size:
                    model.popitem(last=False)
        elif op == "get":
            entry = model.get(key)
            expected = None
            if entry is not None and clock.monotonic() < entry[1]:
                expected = entry[0]
                model.move_to_end(key)
            elif entry is not None:
                del model[key]
            assert cache.get(key) == expected
        elif op == "evict":
            cache.evict(key)
            model.pop(key, None)
        else:
            clock.advance(arg)
        assert len(cache) <= size
        assert len(cache) == len(model)


def test_an_expired_copy_stays_as_a_stale_one_while_the_session_is_used() -> None:
    clock = ManualClock()
    cache = PinCache(10, 60.0, clock, idle_s=100.0)
    cache.put("s", pin(1))
    clock.advance(61)
    assert cache.get("s") is None  # no longer verified: the store is asked first
    assert "s" in cache
    assert cache.stale("s") == pin(1)  # ... but it is the pin if the store cannot answer
    clock.advance(99)
    assert cache.stale("s") == pin(1)  # each use restarts the idle time
    clock.advance(100)
    assert cache.stale("s") is None  # idle as long as the store's TTL: expired everywhere
    assert "s" not in cache


def test_held_lists_sessions_used_within_the_idle_time_most_recent_first() -> None:
    clock = ManualClock()
    cache = PinCache(10, 60.0, clock, idle_s=30.0)
    cache.put("old", pin(1))
    clock.advance(20)
    cache.put("new", pin(2))
    clock.advance(5)
    assert cache.held() == [("new", pin(2), 5.0), ("old", pin(1), 25.0)]
    clock.advance(6)
    assert cache.held() == [("new", pin(2), 11.0)]
    cache.put("back", pin(3), idle_for_s=7.0)
    assert [s for s, _, _ in cache.held()] == ["back", "new"]
