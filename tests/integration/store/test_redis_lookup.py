"""A new session in one round trip (proxy/store/redis_lookup.py), on a real redis-server.

The lookup script reads the pin and, when none is held, writes the data plane's
proposal in the same call: counted here with ``INFO commandstats``, raced between two
stores, run again after ``SCRIPT FLUSH`` (NOSCRIPT), and withheld when this process
holds a copy that a store which lost its data must get back first.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from proxy.core.clock import ManualClock, SystemClock
from proxy.core.errors import StoreUnavailable
from proxy.redis.metrics import RedisMetrics
from proxy.store.redis import RedisPinStore
from proxy.store.redis_wire import redis_client_from_config
from tests.integration.store.test_redis_store import pin, store_config

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from proxy.core.models import Pin
    from tests.fixtures.redis_server import RedisServer


async def calls(client: Redis, *commands: str) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in commands}


@pytest.fixture
async def admin(private_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(private_redis.url)
    yield client
    await client.aclose()


async def opened(url: str, registry: CollectorRegistry | None = None) -> RedisPinStore:
    # Room for 80 concurrent first calls (connections opened, NOSCRIPT) on a busy machine.
    config = store_config(url, op_timeout_ms=2000)
    metrics = None if registry is None else RedisMetrics(registry)
    store = RedisPinStore(config, redis_client_from_config(config), SystemClock(),
                          metrics=metrics)
    await store.start()
    assert store.subscribed
    return store


async def test_a_new_session_costs_one_call_and_a_known_one_is_only_read(
    private_redis: RedisServer, admin: Redis
) -> None:
    registry = CollectorRegistry()
    one, two = await opened(private_redis.url, registry), await opened(private_redis.url)
    try:
        # The very first call meets NOSCRIPT and sends the script (EVAL): then cached.
        assert (await one.lookup("first", propose=lambda: pin(1))).created
        before = await calls(admin, "evalsha", "eval", "set", "getex")
        found = await one.lookup("s", propose=lambda: pin(1))
        assert (found.pin, found.created) == (pin(1), True)
        after = await calls(admin, "evalsha", "eval", "set", "getex")
        # One EVALSHA (commandstats also counts the commands the script ran: GETEX,
        # SET, GETDEL, GET), and the helper measured one call: one round trip.
        assert (after["evalsha"] - before["evalsha"], after["eval"] - before["eval"]) == (1, 0)
        assert (after["getex"] - before["getex"], after["set"] - before["set"]) == (1, 1)
        # The other replica, proposing another pin, reads ours and writes nothing.
        found = await two.lookup("s", propose=lambda: pin(2))
        assert (found.pin, found.created) == (pin(1), False)
        assert await two.get("s") == pin(1)
        # The measured calls: one "get" per lookup of the first store.
        count = registry.get_sample_value(
            "pinproxy_redis_call_duration_seconds_count",
            {"component": "store", "operation": "get"})
        assert count == 2
    finally:
        await one.close()
        await two.close()


async def test_two_stores_racing_on_new_sessions_write_one_pin_each(
    private_redis: RedisServer,
) -> None:
    one, two = await opened(private_redis.url), await opened(private_redis.url)
    try:
        sessions = [f"race-{n}" for n in range(40)]
        answers = await asyncio.gather(*(
            store.lookup(session, propose=lambda p=p: p)  # type: ignore[misc]
            for session in sessions
            for store, p in ((one, pin(1)), (two, pin(2)))
        ))
        for n, session in enumerate(sessions):
            mine, theirs = answers[2 * n], answers[2 * n + 1]
            assert mine.pin == theirs.pin, session  # both follow the one pin written
            assert [mine.created, theirs.created].count(True) == 1, session
            assert await one.get(session) == mine.pin
    finally:
        await one.close()
        await two.close()


async def test_a_flushed_script_cache_is_filled_again(
    private_redis: RedisServer, admin: Redis
) -> None:
    store = await opened(private_redis.url)
    try:
        assert (await store.lookup("a", propose=lambda: pin(1))).created
        await admin.script_flush()
        before = await calls(admin, "eval")
        found = await store.lookup("b", propose=lambda: pin(2))
        assert (found.pin, found.created) == (pin(2), True)
        assert (await calls(admin, "eval"))["eval"] == before["eval"] + 1  # NOSCRIPT, then EVAL
        assert (await store.lookup("c", propose=lambda: pin(3))).created
        assert (await calls(admin, "eval"))["eval"] == before["eval"] + 1  # cached again
    finally:
        await store.close()


async def test_a_held_copy_is_reasserted_not_replaced_by_a_proposal(
    private_redis: RedisServer, admin: Redis
) -> None:
    clock = ManualClock()
    config = store_config(private_redis.url, local_cache_ttl_s=1.0)
    store = RedisPinStore(config, redis_client_from_config(config), clock)
    store._subscribed.set()  # no background tasks: the clock is manual
    try:
        assert await store.pin_if_absent("s", pin(1)) == pin(1)
        await store.sync.catch_up(check_server=True)  # adopt the epoch
        clock.advance(2.0)  # the local copy is due for a re-read, but still held
        await admin.flushall()  # the store lost every pin

        def never() -> Pin | None:
            raise AssertionError("a held copy must be re-asserted before any proposal")

        found = await store.lookup("s", propose=never)
        assert (found.pin, found.created) == (pin(1), False)
        assert await admin.get(store.key("s")) is not None
    finally:
        await store.close()


async def test_a_failed_lookup_is_measured_by_kind(private_redis: RedisServer) -> None:
    registry = CollectorRegistry()
    store = await opened(private_redis.url, registry)
    try:
        private_redis.stop()
        with pytest.raises(StoreUnavailable):
            await store.lookup("s", propose=lambda: pin(1))
        errors = {
            kind: registry.get_sample_value(
                "pinproxy_redis_call_errors_total",
                {"component": "store", "operation": "get", "kind": kind})
            for kind in ("timeout", "connection", "response", "other")
        }
        assert errors == {"timeout": 0, "connection": 1, "response": 0, "other": 0}
    finally:
        private_redis.start()
        await store.close()


async def test_lookups_started_together_go_out_in_one_pipeline(
    private_redis: RedisServer, admin: Redis
) -> None:
    store = await opened(private_redis.url)
    try:
        assert (await store.lookup("warm", propose=lambda: pin(1))).created  # script cached
        assert store.reader.batches == 0  # a lone lookup goes out alone
        before = await calls(admin, "evalsha", "eval")
        sessions = [f"together-{n}" for n in range(30)]
        found = await asyncio.gather(*(
            store.lookup(session, propose=lambda n=n: pin(n % 3 + 1))  # type: ignore[misc]
            for n, session in enumerate(sessions)
        ))
        assert [(f.pin, f.created) for f in found] == [(pin(n % 3 + 1), True) for n in range(30)]
        assert (store.reader.batches, store.reader.batched) == (1, 30)
        after = await calls(admin, "evalsha", "eval")
        # Each lookup is still its own script call, atomic on its own.
        assert (after["evalsha"] - before["evalsha"], after["eval"] - before["eval"]) == (30, 0)
        for session in sessions:
            assert await admin.get(store.key(session)) is not None, session
        # Known now: read from the batch's answers, cached, no call.
        assert (await store.lookup("together-4")).pin == pin(2)
    finally:
        await store.close()


async def test_a_batch_meeting_a_flushed_script_cache_still_answers_each_lookup(
    private_redis: RedisServer, admin: Redis
) -> None:
    store = await opened(private_redis.url)
    try:
        assert (await store.lookup("warm", propose=lambda: pin(1))).created
        await admin.script_flush()
        found = await asyncio.gather(*(
            store.lookup(f"flushed-{n}", propose=lambda: pin(2)) for n in range(8)
        ))
        assert all(f.pin == pin(2) and f.created for f in found)
        assert store.reader.batches == 1
        assert (await store.lookup("after", propose=lambda: pin(3))).created
    finally:
        await store.close()


async def test_a_caller_that_gives_up_leaves_the_rest_of_its_batch_alone(
    private_redis: RedisServer,
) -> None:
    store = await opened(private_redis.url)
    try:
        assert (await store.lookup("warm", propose=lambda: pin(1))).created
        sent = store.reader.sent
        private_redis.pause()  # the batch goes out and waits for its answer
        tasks = [asyncio.create_task(store.lookup(f"gives-up-{n}", propose=lambda: pin(2)))
                 for n in range(6)]
        while store.reader.sent < sent + 6:  # all six handed to redis-py
            await asyncio.sleep(0)
        tasks[0].cancel()
        private_redis.resume()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert all(not isinstance(r, BaseException) and r.created for r in results[1:])
        assert store.reader.batched == 6
    finally:
        private_redis.resume()
        await store.close()


async def test_every_lookup_of_a_batch_fails_as_its_own_call_would_when_redis_is_down(
    private_redis: RedisServer,
) -> None:
    store = await opened(private_redis.url)
    try:
        assert (await store.lookup("warm", propose=lambda: pin(1))).created
        private_redis.stop()
        results = await asyncio.gather(
            *(store.lookup(f"down-{n}", propose=lambda: pin(2)) for n in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(r, StoreUnavailable) for r in results), results
    finally:
        private_redis.start()
        await store.close()
