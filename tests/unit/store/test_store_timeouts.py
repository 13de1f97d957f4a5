"""Pin-store timeouts say whether the store kept answering other calls meanwhile.

A call that times out while other calls succeed waited on this process (for a pooled
connection or for the event loop), not on Redis; the data plane answers that as
overload rather than as a store failure. Driven through the store's one call boundary
with plain awaitables, so no Redis is needed (the client never connects).
"""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from proxy.config.store import StoreConfig
from proxy.core.clock import SystemClock
from proxy.core.errors import StoreUnavailable
from proxy.store.redis import RedisPinStore


def store() -> RedisPinStore:
    config = StoreConfig(kind="redis", url="redis://127.0.0.1:1/0", op_timeout_ms=200)
    return RedisPinStore(config, Redis.from_url(config.url), SystemClock())


async def test_a_timeout_while_other_calls_succeed_says_the_store_is_answering() -> None:
    pins = store()
    stuck = asyncio.create_task(pins._call("get", asyncio.sleep(10)))
    await asyncio.sleep(0)  # one step: the stuck call has started (and waits)
    assert await pins._call("get", asyncio.sleep(0.01, result="answer")) == "answer"
    with pytest.raises(StoreUnavailable) as info:
        await stuck
    assert (info.value.timed_out, info.value.store_answering) == (True, True)


async def test_a_timeout_with_nothing_answering_is_the_store() -> None:
    pins = store()
    assert await pins._call("get", asyncio.sleep(0, result="early")) == "early"
    # That answer came before the next call started.
    with pytest.raises(StoreUnavailable) as info:
        await pins._call("get", asyncio.sleep(10))
    assert (info.value.timed_out, info.value.store_answering) == (True, False)


async def test_a_refused_connection_is_not_a_timeout() -> None:
    pins = store()

    async def refused() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(StoreUnavailable) as info:
        await pins._call("get", refused())
    assert (info.value.timed_out, info.value.store_answering) == (False, False)
