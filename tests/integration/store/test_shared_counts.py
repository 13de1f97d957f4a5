"""Counts shared through a real redis-server: pinned sessions per version (sorted sets
fed by the batched touches) and traffic per region and version across replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from proxy.config.store import StoreConfig
from proxy.core.clock import SystemClock
from proxy.core.events import RequestEvent
from proxy.core.models import Pin
from proxy.store.redis import RedisPinStore
from proxy.store.redis_wire import redis_client_from_config
from proxy.telemetry.traffic import TrafficCounter, TrafficUnavailable
from tests.fixtures.redis_server import RedisServer

K1, K2 = "prompt=v1", "prompt=v2"


def pin(key: str) -> Pin:
    return Pin(key, "b", "r", 0.0)


@pytest_asyncio.fixture
async def clients(redis_url: str) -> AsyncIterator[list[Redis]]:
    made: list[Redis] = []
    yield made
    for client in made:
        await client.aclose()


def client(clients: list[Redis], url: str) -> Redis:
    made = redis_client_from_config(StoreConfig(kind="redis", url=url))
    clients.append(made)
    return made


async def test_pinned_counts_are_shared_and_follow_repins(
    redis_url: str, clients: list[Redis]
) -> None:
    config = StoreConfig(kind="redis", url=redis_url, touch_interval_s=60, pin_ttl_s=600)
    one = RedisPinStore(config, client(clients, redis_url), SystemClock(), owns_client=False)
    two = RedisPinStore(config, client(clients, redis_url), SystemClock(), owns_client=False)
    await one.start()
    await two.start()
    try:
        for i in range(3):
            await one.pin_if_absent(f"s{i}", pin(K1))
        await two.pin_if_absent("t0", pin(K2))
        assert await two.pin_if_absent("s0", pin(K2)) == pin(K1)  # lost: still K1
        # two's own uses are flushed before it counts; one's only when one flushes.
        assert (await two.count_pinned(K1), await two.count_pinned(K2)) == (1, 1)
        await one.flush_touches()
        assert (await two.count_pinned(K1), await two.count_pinned(K2)) == (3, 1)
        assert await one.repin("s1", pin(K2)) == pin(K1)
        assert (await one.count_pinned(K1), await one.count_pinned(K2)) == (2, 2)
        await one.unpin("s2")
        await one.unpin("t0")
        assert (await one.count_pinned(K1), await one.count_pinned(K2)) == (1, 1)
        # A pin that expired behind the store's back leaves the count at its next touch.
        await one.get("s0")  # a cached hit: its touch is pending
        await client(clients, redis_url).delete(one.key("s0"))
        await one.flush_touches()
        assert await one.count_pinned(K1) == 0
    finally:
        await one.close()
        await two.close()


def event(region: str, key: str, at: float) -> RequestEvent:
    return RequestEvent(
        at=at, request_id="r", trace_id="t", session_id=None, method="POST", path="/x",
        status=200, backend_id="b", region=region, version_key=key, new_pin=False,
        version_changed=None, duration_s=0.01, ttfb_s=0.01, error_type=None,
    )  # fmt: skip


async def test_traffic_is_summed_over_replicas(redis_url: str, clients: list[Redis]) -> None:
    clock = SystemClock()
    one = TrafficCounter(
        clock, redis=client(clients, redis_url), key_prefix="t:", flush_interval_s=0.05
    )
    two = TrafficCounter(
        clock, redis=client(clients, redis_url), key_prefix="t:", flush_interval_s=60
    )
    await one.start()
    await two.start()
    try:
        now = clock.time()
        for _ in range(3):
            one.observe(event("r1", K1, now))
        two.observe(event("r1", K2, now))
        two.observe(event("r2", K2, now - 7200))  # outside every window below
        # two flushes itself before reading; one's counts arrive by its background flush.
        deadline = time.monotonic() + 2.0
        while (window := await two.window(300)).counts.get(("r1", K1)) != 3:
            assert time.monotonic() < deadline, window
            await asyncio.sleep(0.02)
        assert window.counts == {("r1", K1): 3, ("r1", K2): 1}
        assert (await one.window(300)).counts == window.counts
        assert (await one.window(3 * 3600)).total == 5
        assert two.pending == 0
        raw = client(clients, redis_url)
        ttl = await raw.ttl(f"t:traffic:{int(now // 60)}")
        assert 24 * 3600 < ttl <= 25 * 3600
    finally:
        await one.close()
        await two.close()


async def test_traffic_kept_while_redis_is_down(
    private_redis: RedisServer, clients: list[Redis]
) -> None:
    clock = SystemClock()
    counter = TrafficCounter(clock, redis=client(clients, private_redis.url), op_timeout_s=0.2)
    counter.observe(event("r1", K1, clock.time()))
    private_redis.stop()
    with pytest.raises(TrafficUnavailable):
        await counter.flush()
    assert counter.pending == 1  # kept for the next flush
    with pytest.raises(TrafficUnavailable):
        await counter.window(60)
    private_redis.restart()
    assert (await counter.window(60)).counts == {("r1", K1): 1}
    await counter.close()
