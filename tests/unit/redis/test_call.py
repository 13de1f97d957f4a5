"""The one Redis call helper: bounded, each failure as the caller's own error.

Against a real redis-server of the test's own: answered, stopped (refused), frozen
(timed out), answered while the event loop was held past the deadline (not a
timeout), and a cancellation that stays a cancellation.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from proxy.core.errors import ProxyError
from proxy.redis.call import RedisCall, RedisFailure
from tests.fixtures.redis_server import RedisServer


class Narrow(ProxyError):
    status = 503
    error_type = "narrow_unavailable"


def narrow(seen: list[RedisFailure], timeout_s: float = 0.3) -> RedisCall:
    def error(failure: RedisFailure) -> Narrow:
        seen.append(failure)
        return Narrow(f"{failure.what} failed: {failure.kind}")

    return RedisCall(timeout_s, error)


async def test_an_answer_passes_and_a_refusal_is_the_callers_error(
    private_redis: RedisServer,
) -> None:
    client = Redis.from_url(private_redis.url, socket_timeout=5)
    seen: list[RedisFailure] = []
    call = narrow(seen)
    try:
        assert await call("ping", client.ping()) is True
        assert not call.failing
        private_redis.stop()
        with pytest.raises(Narrow) as info:
            await call("ping", client.ping())
        assert info.value.message == "ping failed: ConnectionError"
        assert isinstance(info.value.__cause__, Exception)
        (failure,) = seen
        assert (failure.what, failure.timed_out, failure.others_answered) == (
            "ping", False, False)
        assert call.failing
        private_redis.start()
        assert await call("ping", client.ping()) is True
        assert not call.failing
    finally:
        await client.aclose()


async def test_a_frozen_server_is_a_timeout_within_the_bound(private_redis: RedisServer) -> None:
    client = Redis.from_url(private_redis.url, socket_timeout=30)  # the call's bound wins
    seen: list[RedisFailure] = []
    call = narrow(seen)
    try:
        assert await call("ping", client.ping()) is True
        private_redis.pause()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Narrow):
            await call("get", client.get("k"))
        assert loop.time() - started < 2.0
        assert [(f.what, f.timed_out) for f in seen] == [("get", True)]
    finally:
        private_redis.resume()
        await client.aclose()


async def test_a_cancelled_call_is_cancelled_not_a_failure(private_redis: RedisServer) -> None:
    client = Redis.from_url(private_redis.url, socket_timeout=30)
    seen: list[RedisFailure] = []
    call = narrow(seen, timeout_s=30)
    try:
        assert await call("ping", client.ping()) is True
        private_redis.pause()
        task = asyncio.create_task(call("get", client.get("k")))
        done, _ = await asyncio.wait([task], timeout=0.1)
        assert not done  # stuck in redis-py on the frozen server when cancelled
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == []
    finally:
        private_redis.resume()
        await client.aclose()


async def test_an_answer_that_arrived_while_the_loop_was_held_is_not_a_timeout(
    private_redis: RedisServer,
) -> None:
    """The loaded machine's case: the answer is in the socket when the loop runs again,
    past the deadline; the overdue timer must not win over it."""
    client = Redis.from_url(private_redis.url, socket_timeout=30)
    seen: list[RedisFailure] = []
    call = narrow(seen, timeout_s=0.2)
    try:
        assert await call("ping", client.ping()) is True
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(call("ping", client.ping()))
        # Runs after the task sent its command: the loop is held (a saturated core, a
        # process not scheduled) while the answer arrives and the deadline passes.
        loop.call_soon(time.sleep, 0.6)
        assert await task is True
        assert seen == []
        # A server that does not answer still fails the call, held loop or not.
        private_redis.pause()
        started = loop.time()
        frozen = asyncio.create_task(call("get", client.get("k")))
        loop.call_soon(time.sleep, 0.6)
        with pytest.raises(Narrow):
            await frozen
        assert loop.time() - started < 0.6 + 2 * 0.2 + 1.0
        assert [(f.what, f.timed_out) for f in seen] == [("get", True)]
    finally:
        private_redis.resume()
        await client.aclose()
