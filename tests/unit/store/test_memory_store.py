from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.store import StoreConfig
from proxy.core.clock import ManualClock
from proxy.core.models import Pin
from proxy.store.memory import MemoryPinStore

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from typing import Any

    from proxy.store.base import PinStore

T = TypeVar("T")


def pin(n: int) -> Pin:
    return Pin(version_key=f"prompt=v{n}", backend_id=f"b{n}", region="eu", pinned_at=float(n))


def make(ttl: float = 100.0, max_sessions: int = 1000) -> tuple[MemoryPinStore, ManualClock]:
    clock = ManualClock()
    config = StoreConfig(kind="memory", pin_ttl_s=ttl, max_sessions=max_sessions)
    return MemoryPinStore(config, clock), clock


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a store call that must not suspend: it completes on the first step."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the memory store suspended inside an operation")


def test_satisfies_the_pin_store_protocol() -> None:
    store: PinStore = make()[0]
    assert store is not None


async def test_pin_if_absent_first_writer_wins() -> None:
    store, _ = make()
    assert await store.pin_if_absent("s", pin(1)) == pin(1)
    assert await store.pin_if_absent("s", pin(2)) == pin(1)
    assert await store.get("s") == pin(1)


async def test_concurrent_pin_if_absent_has_one_winner() -> None:
    store, _ = make()
    results = await asyncio.gather(*(store.pin_if_absent("s", pin(n)) for n in range(50)))
    assert set(results) == {pin(0)}


async def test_repin_returns_previous_and_replaces() -> None:
    store, _ = make()
    assert await store.repin("s", pin(1)) is None
    assert await store.repin("s", pin(2)) == pin(1)
    assert await store.get("s") == pin(2)


async def test_unpin_returns_pin_and_removes_it() -> None:
    store, _ = make()
    await store.pin_if_absent("s", pin(1))
    assert await store.unpin("s") == pin(1)
    assert await store.get("s") is None
    assert await store.unpin("s") is None
    assert await store.pin_if_absent("s", pin(2)) == pin(2)


async def test_pin_expires_after_ttl_without_access() -> None:
    store, clock = make(ttl=10.0)
    await store.pin_if_absent("s", pin(1))
    clock.advance(9.99)
    assert await store.get("s") == pin(1)
    clock.advance(10.0)
    assert await store.get("s") is None
    assert len(store) == 0


async def test_every_hit_slides_the_ttl() -> None:
    store, clock = make(ttl=10.0)
    await store.pin_if_absent("s", pin(1))
    for _ in range(5):
        clock.advance(9.0)
        assert await store.get("s") == pin(1)
    clock.advance(10.0)
    assert await store.get("s") is None


async def test_least_recently_used_session_is_evicted_at_the_bound() -> None:
    store, _ = make(max_sessions=2)
    await store.pin_if_absent("a", pin(1))
    await store.pin_if_absent("b", pin(2))
    assert await store.get("a") == pin(1)
    await store.pin_if_absent("c", pin(3))
    assert len(store) == 2
    assert await store.get("b") is None
    assert await store.get("a") == pin(1)
    assert await store.get("c") == pin(3)


async def test_sweep_drops_expired_sessions_on_any_call() -> None:
    store, clock = make(ttl=5.0)
    for n in range(10):
        await store.pin_if_absent(f"s{n}", pin(n))
    clock.advance(5.0)
    await store.get("unrelated")
    assert len(store) == 0


async def test_lifecycle_calls_are_harmless() -> None:
    store, _ = make()
    await store.start()
    await store.ping()
    await store.close()
    await store.close()
    assert "closed" in repr(store)


def test_repr_shows_size_and_bound() -> None:
    store, _ = make(max_sessions=7)
    run(store.pin_if_absent("s", pin(1)))
    assert repr(store) == "MemoryPinStore(sessions=1, max_sessions=7, pin_ttl_s=100.0)"


actions = st.lists(
    st.one_of(
        st.tuples(st.just("get"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("pin"), st.integers(0, 5), st.integers(0, 20)),
        st.tuples(st.just("repin"), st.integers(0, 5), st.integers(0, 20)),
        st.tuples(st.just("unpin"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("advance"), st.just(0), st.integers(0, 12)),
    ),
    max_size=60,
)


@settings(max_examples=200)
@given(max_sessions=st.integers(1, 4), script=actions)
def test_matches_a_reference_model(max_sessions: int, script: list[tuple[str, int, int]]) -> None:
    """A pin, once set, is returned unchanged until repin, unpin, expiry or LRU eviction."""
    ttl = 10.0
    store, clock = make(ttl=ttl, max_sessions=max_sessions)
    model: dict[str, tuple[Pin, float, float]] = {}  # session -> pin, expires, last use

    def live() -> None:
        for key in [k for k, (_, exp, _) in model.items() if exp <= clock.monotonic()]:
            del model[key]

    def touch(key: str, value: Pin) -> None:
        model[key] = (value, clock.monotonic() + ttl, clock.monotonic())
        while len(model) > max_sessions:
            # Ties in last use cannot happen out of order: dicts keep insertion order
            # and every touch re-inserts at the end.
            oldest = min(model, key=lambda k: model[k][2])
            del model[oldest]

    for op, key_n, arg in script:
        key = f"s{key_n}"
        live()
        current = model.get(key)
        if op == "get":
            assert run(store.get(key)) == (current[0] if current else None)
            if current:
                model.pop(key)
                touch(key, current[0])
        elif op == "pin":
            expected = current[0] if current else pin(arg)
            assert run(store.pin_if_absent(key, pin(arg))) == expected
            model.pop(key, None)
            touch(key, expected)
        elif op == "repin":
            assert run(store.repin(key, pin(arg))) == (current[0] if current else None)
            model.pop(key, None)
            touch(key, pin(arg))
        elif op == "unpin":
            assert run(store.unpin(key)) == (current[0] if current else None)
            model.pop(key, None)
        else:
            clock.advance(arg)
        assert len(store) <= max_sessions
        live()
        assert len(store) == len(model)
