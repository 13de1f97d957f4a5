"""Admission control over real sockets (limits.*): a bounded queue before the handler,
then 503 proxy_overloaded with Retry-After, counted, logged, and nothing sent upstream.

Requests are held in flight as streams from a slow POP: each admitted client reads its
first chunk (it is past admission, running), and keeps the stream open until the test
lets it go by closing its connection. Every wait is for an event the test can see
(a first chunk, the gate's queue length, an answer), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

import aiohttp

from proxy.core.events import RequestEvent
from tests.fixtures.proxy import RunningProxy, StartProxy, proxy_config
from tests.fixtures.sim import StartPop
from tests.integration.app.test_reload import EditableConfig, _reload
from tests.integration.telemetry.test_metrics import L, scrape, series, wait_for

CHAT: dict[str, Any] = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
STREAM: dict[str, Any] = {**CHAT, "stream": True}


class Recorder:
    """A request observer: what the request log would write, kept."""

    def __init__(self) -> None:
        self.events: list[RequestEvent] = []

    def observe(self, event: RequestEvent) -> None:
        self.events.append(event)


async def _slow_proxy(
    start_pop: StartPop, start_proxy: StartProxy, observer: Recorder | None = None,
    **limits: int,
) -> tuple[RunningProxy, Any]:
    # 100 tokens at 2 a second: a stream outlives every test here unless let go.
    pop = await start_pop("pop-slow", "r1", "v1", tokens_per_second=2, completion_tokens=100)
    proxy = await start_proxy([pop], observers=() if observer is None else (observer,),
                              limits=limits)
    await wait_for(lambda: bool(proxy.registry.snapshot.serving_keys()))
    return proxy, pop


async def _hold_streams(stack: AsyncExitStack, proxy: RunningProxy, count: int) -> list[
        aiohttp.ClientResponse]:
    """``count`` streams admitted and running: each one's first chunk has arrived."""
    held = []
    for index in range(count):
        session = await stack.enter_async_context(aiohttp.ClientSession())
        resp = await stack.enter_async_context(session.post(
            f"{proxy.url}/v1/chat/completions", json=STREAM,
            headers={"X-Session-ID": f"held-{index}"}))
        assert resp.status == 200, await resp.text()
        assert await resp.content.readany()
        held.append(resp)
    return held


async def _ask(http: aiohttp.ClientSession, proxy: RunningProxy, session: str
               ) -> tuple[int, dict[str, Any], str | None]:
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers={"X-Session-ID": session}) as resp:
        return resp.status, await resp.json(), resp.headers.get("Retry-After")


async def test_the_excess_over_in_flight_and_queue_is_shed_and_the_rest_served(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    max_in_flight, queue, excess = 3, 4, 5
    recorder = Recorder()
    proxy, pop = await _slow_proxy(start_pop, start_proxy, recorder,
                                   max_in_flight=max_in_flight, queue=queue,
                                   queue_timeout_ms=60_000)
    gate = proxy.services.admission
    async with AsyncExitStack() as stack:
        held = await _hold_streams(stack, proxy, max_in_flight)
        assert gate.in_flight == max_in_flight
        sent_upstream = len(pop.requests)
        sessions = [f"late-{i}" for i in range(queue + excess)]
        asks = [asyncio.create_task(_ask(http, proxy, session)) for session in sessions]
        # The queue fills and every arrival beyond it is answered at once.
        await wait_for(lambda: gate.queued == queue and sum(a.done() for a in asks) == excess)
        shed = [a.result() for a in asks if a.done()]
        shed_sessions = [s for s, a in zip(sessions, asks, strict=True) if a.done()]
        for status, body, retry_after in shed:
            assert status == 503
            assert (body["error"]["type"], body["error"]["code"], body["error"]["reason"]) == (
                "proxy_overloaded", "proxy_overloaded", "queue_full")
            assert retry_after is not None
            assert int(retry_after) >= 1
        assert len(pop.requests) == sent_upstream  # nothing of a shed or queued one
        # Streams running are never cut by admission; letting them go admits the queue.
        for resp in held:
            resp.close()
        answers = await asyncio.gather(*(a for a in asks if not a.done()))
    assert [status for status, _, _ in answers] == [200] * queue
    assert gate.in_flight == 0
    assert gate.queued == 0
    samples = await scrape(http, proxy.admin_url)
    sheds = series(samples, "pinproxy_shed_requests_total")
    assert sheds[L(reason="queue_full")] == excess
    assert sheds[L(reason="queue_timeout")] == sheds[L(reason="loop_lag")] == 0
    # In the request log as what was answered; no pin was written for them.
    logged = [e for e in recorder.events if e.status == 503]
    assert len(logged) == excess
    assert {e.error_type for e in logged} == {"proxy_overloaded"}
    store = proxy.services.store
    for session in shed_sessions:
        assert await store.get(session) is None
    for session in set(sessions) - set(shed_sessions):
        assert await store.get(session) is not None


async def test_a_queued_request_is_shed_when_its_wait_runs_out(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy, _ = await _slow_proxy(start_pop, start_proxy, max_in_flight=1, queue=1,
                                 queue_timeout_ms=200)
    async with AsyncExitStack() as stack:
        await _hold_streams(stack, proxy, 1)
        status, body, retry_after = await _ask(http, proxy, "waits")
        assert proxy.services.admission.in_flight == 1  # the stream still runs
    assert (status, body["error"]["code"], body["error"]["reason"]) == (
        503, "proxy_overloaded", "queue_timeout")
    assert retry_after is not None
    samples = await scrape(http, proxy.admin_url)
    assert series(samples, "pinproxy_shed_requests_total")[L(reason="queue_timeout")] == 1


async def test_health_readiness_and_the_admin_api_are_never_shed(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy, _ = await _slow_proxy(start_pop, start_proxy, max_in_flight=1, queue=0)
    async with AsyncExitStack() as stack:
        await _hold_streams(stack, proxy, 1)
        assert (await _ask(http, proxy, "refused"))[0] == 503
        for path in (proxy.settings.listen.health_path, proxy.settings.listen.ready_path):
            async with http.get(f"{proxy.url}{path}") as resp:
                assert resp.status == 200, (path, await resp.text())
        samples = await scrape(http, proxy.admin_url)
    assert series(samples, "pinproxy_shed_requests_total")[L(reason="queue_full")] == 1


async def test_a_reload_applies_new_limits_to_the_running_gate(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("pop-slow", "r1", "v1", tokens_per_second=2, completion_tokens=100)
    config = EditableConfig(proxy_config([pop], limits={"max_in_flight": 1, "queue": 0}))
    proxy = await start_proxy([pop], reload_from=config, limits={"max_in_flight": 1,
                                                                 "queue": 0})
    await wait_for(lambda: bool(proxy.registry.snapshot.serving_keys()))
    async with AsyncExitStack() as stack:
        await _hold_streams(stack, proxy, 1)
        assert (await _ask(http, proxy, "before"))[0] == 503
        config.data["limits"] = {"max_in_flight": 2, "queue": 0}
        status, body = await _reload(http, proxy)
        assert (status, body["changed"]) == (200, ["limits.max_in_flight"])
        assert (await _ask(http, proxy, "after"))[0] == 200


async def test_arrivals_while_the_event_loop_runs_late_are_shed_when_set(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], limits={"max_loop_lag_ms": 100})
    await wait_for(lambda: bool(proxy.registry.snapshot.serving_keys()))
    assert (await _ask(http, proxy, "on-time"))[0] == 200
    loop = asyncio.get_running_loop()
    until = loop.time() + 1.5

    def saturate() -> None:
        # The proxy shares this loop: holding it in 200 ms slices is what a core with
        # more work than it can do looks like to every request.
        time.sleep(0.2)
        if loop.time() < until:
            loop.call_soon(saturate)

    loop.call_soon(saturate)
    status, body, retry_after = await _ask(http, proxy, "late")
    assert (status, body["error"]["code"], body["error"]["reason"]) == (
        503, "proxy_overloaded", "loop_lag")
    assert retry_after is not None
    # Once the loop is on time again, arrivals are admitted.
    lag = proxy.services.loop_lag
    await wait_for(lambda: loop.time() > until and lag.worst_since(
        time.monotonic() - 0.5) < 0.1)
    assert (await _ask(http, proxy, "on-time-again"))[0] == 200
    samples = await scrape(http, proxy.admin_url)
    assert series(samples, "pinproxy_shed_requests_total")[L(reason="loop_lag")] == 1
