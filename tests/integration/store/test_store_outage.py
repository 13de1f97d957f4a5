"""Pins outlive the store: outages, cut-off replicas and data loss (issue 10), on real Redis."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from proxy.core.clock import ManualClock, SystemClock
from proxy.core.errors import StoreUnavailable
from proxy.core.models import Pin
from proxy.store.base import Lookup
from proxy.store.redis import RedisPinStore
from proxy.store.redis_wire import redis_client_from_config
from tests.fixtures.redis_server import RedisServer
from tests.integration.store.test_redis_store import eventually, pin, store_config

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from typing import Any

    from proxy.core.clock import Clock
    from tests.fixtures.redis_server import TcpRelay

    OpenStore = Callable[..., Awaitable[RedisPinStore]]
    Conflicts = list[tuple[str, Pin, Pin]]


@pytest_asyncio.fixture
async def conflicts() -> Conflicts:
    return []


@pytest_asyncio.fixture
async def open_store(conflicts: Conflicts) -> AsyncIterator[OpenStore]:
    opened: list[RedisPinStore] = []

    async def factory(url: str, clock: Clock | None = None, **overrides: Any) -> RedisPinStore:
        config = store_config(url, **overrides)
        store = RedisPinStore(
            config, redis_client_from_config(config), clock or SystemClock(),
            on_conflict=lambda *args: conflicts.append(args),
        )  # fmt: skip
        opened.append(store)
        await store.start()
        return store

    yield factory
    for store in opened:
        await store.close()


@pytest_asyncio.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def answers(check: Callable[[], Awaitable[object]], expected: object) -> bool:
    try:
        return await check() == expected
    except StoreUnavailable:
        return False


async def test_cached_pins_are_served_through_an_outage_even_past_the_cache_ttl(
    private_redis: RedisServer, open_store: OpenStore
) -> None:
    store = await open_store(private_redis.url, local_cache_ttl_s=0.05)
    assert await store.pin_if_absent("s", pin(1)) == pin(1)
    private_redis.stop()
    started = time.monotonic()
    while time.monotonic() - started < 0.3:  # well past the cache TTL, several times
        assert await store.get("s") == pin(1)
    with pytest.raises(StoreUnavailable):
        await store.get("never-seen")  # a session this replica does not hold: refused
    private_redis.restart()

    async def back() -> bool:
        return store.subscribed and await answers(lambda: store.get("s"), pin(1))

    await eventually(back, within_s=5.0)


async def test_a_repin_made_while_a_replica_was_cut_off_wins_when_it_reconnects(
    redis_url: str, redis_relay: TcpRelay, open_store: OpenStore
) -> None:
    cut_off = await open_store(redis_relay.url, touch_interval_s=60.0)
    other = await open_store(redis_url, touch_interval_s=60.0)
    await cut_off.pin_if_absent("moved", pin(1))
    await cut_off.pin_if_absent("dropped", pin(1))
    subscriptions = cut_off.subscriptions
    redis_relay.cut()
    assert await other.repin("moved", pin(2)) == pin(1)
    assert await other.unpin("dropped") == pin(1)
    # Cut off, the replica still answers with what it holds (it cannot know better) ...
    assert await cut_off.get("moved") == pin(1)
    redis_relay.restore()

    async def replayed() -> bool:
        return cut_off.subscriptions > subscriptions and await answers(
            lambda: cut_off.get("moved"), pin(2))

    # ... and the change wins as soon as it is back: the log was replayed.
    await eventually(replayed, within_s=5.0)
    assert await cut_off.get("dropped") is None
    assert cut_off.sync.losses == 0


async def test_a_replica_that_missed_more_repins_than_the_log_keeps_drops_its_cache(
    redis_url: str, redis_relay: TcpRelay, open_store: OpenStore
) -> None:
    cut_off = await open_store(redis_relay.url, touch_interval_s=60.0, repin_log_size=100)
    other = await open_store(redis_url, touch_interval_s=60.0, repin_log_size=100)
    await cut_off.pin_if_absent("kept", pin(1))
    subscriptions = cut_off.subscriptions
    redis_relay.cut()
    for n in range(400):
        await other.repin(f"busy-{n}", pin(2))
    redis_relay.restore()

    async def dropped() -> bool:
        return cut_off.subscriptions > subscriptions and cut_off.cached == 0

    await eventually(dropped, within_s=5.0)
    assert await cut_off.get("kept") == pin(1)  # read again from the store: unchanged


async def test_only_pins_used_within_the_ttl_are_written_back_with_the_ttl_they_had_left(
    redis_url: str, redis_server: RedisServer, open_store: OpenStore, raw: Redis
) -> None:
    clock = ManualClock()
    store = await open_store(redis_url, clock, pin_ttl_s=30.0, touch_interval_s=0.05)
    await store.pin_if_absent("idle", pin(1))
    clock.advance(20)
    await store.pin_if_absent("used", pin(2))
    clock.advance(15)  # "idle" unused for 35 s: expired in the store; "used" has 15 s left
    redis_server.flushall()

    async def written_back() -> bool:
        return store.sync.reasserted == 1

    await eventually(written_back, within_s=2.0)
    assert store.sync.losses == 1
    assert await raw.exists(store.key("idle")) == 0
    assert 10_000 < await raw.pttl(store.key("used")) <= 15_000


async def test_a_conflicting_pin_written_meanwhile_wins_is_counted_and_marked_once(
    redis_url: str, redis_server: RedisServer, open_store: OpenStore, conflicts: Conflicts
) -> None:
    holder = await open_store(redis_url, touch_interval_s=60.0)
    other = await open_store(redis_url, touch_interval_s=60.0)
    await holder.pin_if_absent("s", pin(1))
    redis_server.flushall()
    # Before the holder notices, another replica pins the session afresh.
    assert await other.pin_if_absent("s", pin(2)) == pin(2)
    # The holder's next miss reads the epoch with it and starts the recovery.
    assert await holder.get("unrelated") is None

    async def conflicted() -> bool:
        return holder.sync.conflicts == 1

    await eventually(conflicted, within_s=2.0)
    assert conflicts == [("s", pin(1), pin(2))]

    async def marked() -> bool:
        return await other.lookup("s") == Lookup(pin(2), changed_from=pin(1).version_key)

    # The broadcast evicts every copy; whichever replica serves next marks its answer.
    await eventually(marked, within_s=1.0)
    assert await holder.lookup("s") == Lookup(pin(2))
    assert await other.lookup("s") == Lookup(pin(2))


async def test_a_miss_after_data_loss_says_how_recent_the_loss_was(
    redis_url: str, redis_server: RedisServer, open_store: OpenStore
) -> None:
    store = await open_store(redis_url, touch_interval_s=60.0)
    assert (await store.lookup("new")).lost_data_s_ago == float("inf")
    redis_server.flushall()
    found = await store.lookup("new")
    assert found.pin is None
    assert found.lost_data_s_ago < 1.0


async def test_a_restart_that_kept_the_data_is_seen_by_its_run_id_and_conflicts_with_nothing(
    open_store: OpenStore, conflicts: Conflicts
) -> None:
    # An AOF restart keeps the epoch, but may have lost its last second of pins.
    with RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always")) as server:
        store = await open_store(server.url, touch_interval_s=60.0)
        await store.pin_if_absent("s", pin(1))
        server.restart()

        async def written_back() -> bool:
            return store.sync.reasserted + store.sync.losses >= 1 and not store.sync.recovering

        await eventually(written_back, within_s=5.0)
        assert store.sync.losses == 1
        assert conflicts == []
        assert await answers(lambda: store.get("s"), pin(1))
