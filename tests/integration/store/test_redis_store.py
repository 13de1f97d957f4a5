"""RedisPinStore against a real, private redis-server (see tests/fixtures/redis_server.py)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import orjson
import pytest
import pytest_asyncio
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.config.store import StoreConfig
from proxy.core.clock import ManualClock, SystemClock
from proxy.core.errors import StoreUnavailable
from proxy.core.models import Pin
from proxy.store.redis import RedisPinStore
from proxy.store.redis_wire import redis_client_from_config
from tests.fixtures.redis_server import RedisServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from typing import Any

    OpenStore = Callable[..., Awaitable[RedisPinStore]]

OP_TIMEOUT_MS = 300
PREFIX = "t:"


def pin(n: int) -> Pin:
    return Pin(version_key=f"prompt=v{n}", backend_id=f"b{n}", region="eu", pinned_at=1000.0 + n)


def fields(p: Pin) -> dict[str, Any]:
    return {
        "version_key": p.version_key,
        "backend_id": p.backend_id,
        "region": p.region,
        "pinned_at": p.pinned_at,
    }


def key(session_id: str) -> bytes:
    return f"{PREFIX}pin:{session_id}".encode()


def stored(raw_value: bytes | str | None) -> dict[str, Any]:
    assert raw_value is not None
    loaded: dict[str, Any] = orjson.loads(raw_value)
    return loaded


def store_config(url: str, **overrides: Any) -> StoreConfig:
    values: dict[str, Any] = {
        "kind": "redis",
        "url": url,
        "key_prefix": PREFIX,
        "pin_ttl_s": 30.0,
        "local_cache_ttl_s": 60.0,
        "touch_interval_s": 0.05,
        "op_timeout_ms": OP_TIMEOUT_MS,
    }
    values.update(overrides)
    return StoreConfig(**values)


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float) -> float:
    """Poll ``check`` until it holds; return how long that took, or fail at the deadline."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > within_s:
            pytest.fail(f"condition not reached within {within_s}s")
        await asyncio.sleep(0.01)


@pytest_asyncio.fixture
async def open_store() -> AsyncIterator[OpenStore]:
    opened: list[RedisPinStore] = []

    async def factory(
        url: str, *, require_subscribed: bool = True, **overrides: Any
    ) -> RedisPinStore:
        config = store_config(url, **overrides)
        store = RedisPinStore(config, redis_client_from_config(config), SystemClock())
        opened.append(store)
        await store.start()
        assert store.subscribed or not require_subscribed
        return store

    yield factory
    for store in opened:
        await store.close()


@pytest_asyncio.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def test_fixtures_never_use_the_machines_redis(
    redis_server: RedisServer, private_redis: RedisServer, redis_url: str
) -> None:
    assert redis_server.port != 6379
    assert private_redis.port != 6379
    assert redis_server.port != private_redis.port
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"


async def test_concurrent_pin_if_absent_across_two_stores_has_one_winner(
    redis_url: str, open_store: OpenStore, raw: Redis
) -> None:
    # A generous timeout: this is about atomicity, and each store's cold pool opens
    # dozens of connections at once, which is slow on a loaded machine.
    a = await open_store(redis_url, op_timeout_ms=3000)
    b = await open_store(redis_url, op_timeout_ms=3000)
    calls = [(a if n % 2 else b).pin_if_absent("race", pin(n)) for n in range(100)]
    results = await asyncio.gather(*calls)
    winners = set(results)
    assert len(winners) == 1
    winner = results[0]
    assert winner in {pin(n) for n in range(100)}
    assert stored(await raw.get(key("race"))) == fields(winner)
    assert await a.get("race") == winner
    assert await b.get("race") == winner


async def test_cached_get_costs_no_round_trip(
    private_redis: RedisServer, open_store: OpenStore
) -> None:
    store = await open_store(private_redis.url)
    assert await store.pin_if_absent("cached", pin(1)) == pin(1)
    private_redis.pause()
    try:
        start = time.monotonic()
        assert await store.get("cached") == pin(1)
        assert time.monotonic() - start < 0.02
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await store.get("not-cached")
        elapsed = time.monotonic() - start
        assert OP_TIMEOUT_MS / 1000 * 0.9 <= elapsed < OP_TIMEOUT_MS / 1000 + 0.3
        assert info.value.status == 503
    finally:
        private_redis.resume()


async def test_cache_hit_slides_ttl_in_a_later_batch(
    redis_url: str, open_store: OpenStore, raw: Redis
) -> None:
    store = await open_store(redis_url, touch_interval_s=0.2)
    await store.pin_if_absent("s", pin(1))
    await raw.pexpire(key("s"), 2000)
    assert await store.get("s") == pin(1)
    assert store.pending_touches == 1
    assert await raw.pttl(key("s")) <= 2000  # the hit itself sent nothing

    async def slid() -> bool:
        return bool(await raw.pttl(key("s")) > 20_000)

    await eventually(slid, within_s=1.0)
    assert await raw.pttl(key("s")) <= 30_000
    assert store.pending_touches == 0


async def test_cache_miss_reads_and_slides_ttl_in_one_call(
    redis_url: str, open_store: OpenStore, raw: Redis
) -> None:
    await raw.set(key("s"), orjson.dumps(fields(pin(4))), px=2000)
    store = await open_store(redis_url, touch_interval_s=60.0)
    assert await store.get("s") == pin(4)
    assert 20_000 < await raw.pttl(key("s")) <= 30_000
    assert store.pending_touches == 0


async def test_repin_evicts_other_stores_copy_within_a_second(
    redis_url: str, open_store: OpenStore, raw: Redis
) -> None:
    # No touch flush during the test: only the broadcast can evict b's copy.
    a = await open_store(redis_url, touch_interval_s=60.0)
    b = await open_store(redis_url, touch_interval_s=60.0)
    await a.pin_if_absent("s", pin(1))
    assert await b.get("s") == pin(1)
    assert b.cached == 1
    assert await a.repin("s", pin(2)) == pin(1)
    assert stored(await raw.get(key("s"))) == fields(pin(2))

    async def b_sees_new_pin() -> bool:
        return await b.get("s") == pin(2)

    assert await eventually(b_sees_new_pin, within_s=1.0) < 1.0
    assert await a.get("s") == pin(2)


async def test_unpin_evicts_other_stores_copy_within_a_second(
    redis_url: str, open_store: OpenStore, raw: Redis
) -> None:
    # No touch flush during the test: only the broadcast can evict b's copy.
    a = await open_store(redis_url, touch_interval_s=60.0)
    b = await open_store(redis_url, touch_interval_s=60.0)
    await a.pin_if_absent("s", pin(1))
    assert await b.get("s") == pin(1)
    assert await a.unpin("s") == pin(1)
    assert await raw.exists(key("s")) == 0
    assert await a.get("s") is None

    async def b_sees_no_pin() -> bool:
        return await b.get("s") is None

    await eventually(b_sees_no_pin, within_s=1.0)
    assert await a.unpin("s") is None


async def test_pin_gone_from_redis_is_dropped_locally_by_the_touch_flush(
    redis_url: str, open_store: OpenStore, raw: Redis
) -> None:
    store = await open_store(redis_url)
    await store.pin_if_absent("s", pin(1))
    await raw.delete(key("s"))  # expiry in Redis: no invalidation is published
    assert await store.get("s") == pin(1)  # still served from the local copy

    async def dropped() -> bool:
        return await store.get("s") is None

    await eventually(dropped, within_s=1.0)
    assert store.cached == 0


async def test_a_restart_empty_keeps_cached_pins_and_writes_them_back(
    private_redis: RedisServer, open_store: OpenStore
) -> None:
    # Was: the restart cleared the cache, and the session was pinned afresh (issue 10).
    a = await open_store(private_redis.url)
    b = await open_store(private_redis.url)
    await a.pin_if_absent("s", pin(1))
    assert a.cached == 1
    assert a.subscriptions == 1
    private_redis.restart()  # comes back empty: the pin is gone from Redis
    assert await a.get("s") == pin(1)  # the cached pin is still the pin

    async def resubscribed() -> bool:
        return a.subscribed and a.subscriptions == 2 and b.subscriptions == 2

    await eventually(resubscribed, within_s=5.0)

    async def written_back() -> bool:
        try:
            return await b.get("s") == pin(1)
        except StoreUnavailable:
            return False

    await eventually(written_back, within_s=2.0)
    assert a.sync.losses == 1

    # Written back once in the fleet: by a (its background re-assertion or a lookup
    # that found the store empty), or by b when b held the pin as well; SET NX lets
    # exactly one of them write it, and only a write is counted. The writer counts it
    # when it reads its own reply, which may come after b has read the pin.
    async def counted() -> bool:
        return a.sync.reasserted + b.sync.reasserted > 0

    await eventually(counted, within_s=2.0)
    assert a.sync.reasserted + b.sync.reasserted == 1, (a.sync, b.sync, b.cached)
    assert await a.pin_if_absent("s", pin(2)) == pin(1)
    assert await b.repin("s", pin(3)) == pin(1)

    async def a_invalidated() -> bool:
        return await a.get("s") == pin(3)

    await eventually(a_invalidated, within_s=1.0)


async def test_client_with_redis_py_default_retries_recovers_after_restart(
    private_redis: RedisServer,
) -> None:
    # Whatever retry policy the composition root gives the client, a restart must end
    # with the subscription back and the cached pin written back to the empty store.
    config = store_config(private_redis.url)
    client = Redis.from_url(private_redis.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    store = RedisPinStore(config, client, SystemClock())
    await store.start()
    try:
        await store.pin_if_absent("s", pin(1))
        assert store.cached == 1
        private_redis.restart()

        async def resubscribed() -> bool:
            return store.subscriptions == 2 and store.subscribed and store.sync.reasserted == 1

        await eventually(resubscribed, within_s=5.0)
        assert store.cached == 1
    finally:
        await store.close()


async def test_every_operation_raises_store_unavailable_when_redis_is_dead(
    private_redis: RedisServer, open_store: OpenStore
) -> None:
    store = await open_store(private_redis.url)
    private_redis.stop()
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get("s"),
        lambda: store.pin_if_absent("s", pin(1)),
        lambda: store.repin("s", pin(1)),
        lambda: store.unpin("s"),
        store.ping,
    ]
    for operation in operations:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await operation()
        assert time.monotonic() - start < OP_TIMEOUT_MS / 1000 + 0.2
        assert info.value.status == 503
        assert isinstance(info.value.__cause__, RedisError | OSError)

    async def cache_disabled() -> bool:
        return not store.subscribed

    await eventually(cache_disabled, within_s=1.0)


async def test_password_is_used_and_never_appears_in_errors(open_store: OpenStore) -> None:
    with RedisServer(extra_args=("--requirepass", "s3cret-pw")) as server:
        good = await open_store(server.url, password=SecretStr("s3cret-pw"))
        await good.ping()
        assert await good.pin_if_absent("s", pin(1)) == pin(1)
        for url, password in [
            (server.url, SecretStr("wrong-pw-1")),
            (f"redis://:wrong-pw-2@127.0.0.1:{server.port}/0", None),
        ]:
            config = store_config(url, password=password)
            bad = RedisPinStore(config, redis_client_from_config(config), SystemClock())
            with pytest.raises(StoreUnavailable) as info:
                await bad.ping()
            text = f"{info.value.message} {info.value!r} {bad!r}"
            assert "wrong-pw" not in text
            assert "s3cret" not in text
            await bad.close()
        await good.close()


async def test_any_session_id_maps_to_its_own_safe_key(
    redis_url: str, open_store: OpenStore, raw: Redis
) -> None:
    ids = [
        "plain",
        "with space",
        "ünïcödé-会话-🙂",
        "*?[]{}\\'\"",
        "a:b:c",
        "pin:plain",
        "x" * 256,
        "\udcff\udc80-surrogate-escaped",
        "",
    ]
    store = await open_store(redis_url)
    for n, session_id in enumerate(ids):
        assert await store.pin_if_absent(session_id, pin(n)) == pin(n)
    other = await open_store(redis_url)
    for n, session_id in enumerate(ids):
        assert await other.get(session_id) == pin(n)
    # One pin key per session (per-version count keys live beside them).
    pin_keys = [k async for k in raw.scan_iter(match=b"t:pin:*")]
    assert len(pin_keys) == len(ids)
    assert await raw.exists(key("plain")) == 1
    assert store.key("plain") == b"t:pin:plain"
    assert await other.repin(ids[7], pin(99)) == pin(7)

    async def invalidated() -> bool:
        return await store.get(ids[7]) == pin(99)

    await eventually(invalidated, within_s=1.0)


async def test_unreadable_stored_pin_is_refused(
    redis_url: str, open_store: OpenStore, raw: Redis
) -> None:
    await raw.set(key("s"), b"{not json")
    store = await open_store(redis_url)
    with pytest.raises(StoreUnavailable, match="unreadable"):
        await store.get("s")
    with pytest.raises(StoreUnavailable, match="unreadable"):
        await store.pin_if_absent("s", pin(1))
    # An explicit repin overwrites the garbage instead of refusing.
    assert await store.repin("s", pin(2)) is None
    assert await store.get("s") == pin(2)


async def test_starts_without_redis_and_subscribes_once_it_is_up(
    private_redis: RedisServer, open_store: OpenStore
) -> None:
    private_redis.stop()
    store = await open_store(private_redis.url, require_subscribed=False)
    assert not store.subscribed
    with pytest.raises(StoreUnavailable):
        await store.get("s")
    private_redis.restart()

    async def subscribed() -> bool:
        return store.subscribed

    await eventually(subscribed, within_s=3.0)
    assert await store.pin_if_absent("s", pin(1)) == pin(1)
    assert store.cached == 1


async def test_close_flushes_touches_and_is_idempotent(
    redis_url: str, open_store: OpenStore, raw: Redis
) -> None:
    store = await open_store(redis_url, touch_interval_s=60.0)
    await store.pin_if_absent("s", pin(1))
    await raw.pexpire(key("s"), 2000)
    assert await store.get("s") == pin(1)
    assert store.pending_touches == 1
    await store.close()
    assert 20_000 < await raw.pttl(key("s")) <= 30_000
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.get("s")


async def test_repr_shows_prefix_cache_and_pending_touches(
    redis_url: str, open_store: OpenStore
) -> None:
    store = await open_store(redis_url, touch_interval_s=60.0)
    await store.pin_if_absent("s", pin(1))
    await store.get("s")
    assert repr(store) == (
        f"RedisPinStore(prefix='t:', url='{redis_url}', cached=1, pending_touches=1, "
        "subscribed=True, closed=False)"
    )


class ScriptedPubSub:
    """Stands in for redis-py's PubSub: replays messages, records pings."""

    def __init__(self, clock: ManualClock, script: list[dict[str, Any] | None]) -> None:
        self.clock = clock
        self.script = script
        self.pings = 0

    # Same keyword as redis-py's PubSub.get_message, which the store calls.
    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        if not self.script:
            raise AssertionError("script exhausted")
        self.clock.advance(timeout)
        return self.script.pop(0)

    async def ping(self) -> None:
        self.pings += 1


def offline_store(clock: ManualClock) -> RedisPinStore:
    config = store_config("redis://127.0.0.1:1/0")
    return RedisPinStore(config, Redis.from_url(config.url), clock)


async def test_a_subscribe_confirmation_keeps_the_cache_and_messages_evict() -> None:
    # Was: every confirmation cleared the cache; now the repin log replay (which fails
    # here: there is no server, so it is retried later) decides what to evict.
    clock = ManualClock()
    store = offline_store(clock)
    store._subscribed.set()
    store._cache.put("a", pin(1))
    store._cache.put("b", pin(2))
    store._cache.put("\udcff", pin(3))
    script: list[dict[str, Any] | None] = [
        {"type": "message", "data": b"a"},
        {"type": "message", "data": "\udcff".encode("utf-8", "surrogatepass")},
        None,  # nothing more waiting: the batch of two is applied
    ]
    with pytest.raises(AssertionError, match="exhausted"):
        await store._subscriber._listen(ScriptedPubSub(clock, script))  # type: ignore[arg-type]
    assert ("a" in store._cache, "b" in store._cache, "\udcff" in store._cache) == (
        False,
        True,
        False,
    )
    with pytest.raises(AssertionError, match="exhausted"):
        await store._subscriber._listen(ScriptedPubSub(clock, [{"type": "subscribe", "data": 1}]))  # type: ignore[arg-type]
    assert store.cached == 1
    assert store.subscriptions == 1


async def test_silent_subscription_is_pinged_then_abandoned() -> None:
    clock = ManualClock()
    store = offline_store(clock)
    pubsub = ScriptedPubSub(clock, [None] * 40)
    with pytest.raises(RedisError, match="stopped answering"):
        await store._subscriber._listen(pubsub)  # type: ignore[arg-type]
    assert pubsub.pings == 1
    # Idle for 5 s before the ping, then more than 1 s without a pong.
    assert len(pubsub.script) == 40 - 13
