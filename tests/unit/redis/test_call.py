"""The one Redis call helper: bounded, each failure as the caller's own error.

Against a real redis-server of the test's own: answered, stopped (refused), frozen
(timed out), answered while the event loop was held past the deadline (not a
timeout), and a cancellation that stays a cancellation.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from proxy.core.errors import ProxyError
from proxy.redis.call import RedisCall, RedisFailure
from proxy.redis.metrics import ERROR_KINDS, RedisMetrics, error_kind
from tests.fixtures.redis_server import RedisServer


class Narrow(ProxyError):
    status = 503
    error_type = "narrow_unavailable"


def narrow(
    seen: list[RedisFailure], timeout_s: float = 0.3, metrics: RedisMetrics | None = None
) -> RedisCall:
    def error(failure: RedisFailure) -> Narrow:
        seen.append(failure)
        return Narrow(f"{failure.what} failed: {failure.kind}")

    return RedisCall(timeout_s, error, metrics=metrics, component="test", operations=("ping",))


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"component": "test", **labels})


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


async def test_every_call_is_timed_and_each_failure_counted_by_kind(
    private_redis: RedisServer,
) -> None:
    client = Redis.from_url(private_redis.url, socket_timeout=30)
    registry = CollectorRegistry()
    call = narrow([], timeout_s=0.3, metrics=RedisMetrics(registry))
    count = "pinproxy_redis_call_duration_seconds_count"
    errors = "pinproxy_redis_call_errors_total"
    # Declared operations are exported at 0 before their first call.
    assert sample(registry, count, operation="ping") == 0
    assert {k: sample(registry, errors, operation="ping", kind=k) for k in ERROR_KINDS} == {
        k: 0 for k in ERROR_KINDS}
    try:
        assert await call("ping", client.ping()) is True
        with pytest.raises(Narrow):
            await call("incr", client.incr("not-a-number-key", 1.5))  # type: ignore[arg-type]
        private_redis.pause()
        with pytest.raises(Narrow):
            await call("get", client.get("k"))
        private_redis.resume()
        private_redis.stop()
        with pytest.raises(Narrow):
            await call("ping", client.ping())
    finally:
        if not private_redis.running:
            private_redis.start()
        await client.aclose()
    assert sample(registry, count, operation="ping") == 2
    assert sample(registry, count, operation="get") == 1  # an undeclared name binds its own
    assert sample(registry, errors, operation="incr", kind="response") == 1
    assert sample(registry, errors, operation="get", kind="timeout") == 1
    assert sample(registry, errors, operation="ping", kind="connection") == 1
    timed = sample(registry, "pinproxy_redis_call_duration_seconds_sum", operation="get")
    assert timed is not None
    assert 0.3 <= timed < 2.0  # the timeout's wait is in the histogram too


def test_error_kinds() -> None:
    assert error_kind(TimeoutError(), False) == "timeout"
    assert error_kind(ResponseError("READONLY"), False) == "response"
    assert error_kind(ConnectionRefusedError(), False) == "connection"
    assert error_kind(RuntimeError("x"), False) == "other"


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
