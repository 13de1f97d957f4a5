"""Every request, answered or not, produces exactly one RequestEvent for the observers."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from proxy.core.events import RequestEvent
from proxy.core.models import VersionBundle
from tests.fixtures.proxy import StartProxy
from tests.fixtures.sim import StartPop

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}


class Recorder:
    def __init__(self) -> None:
        self.events: list[RequestEvent] = []

    def observe(self, event: RequestEvent) -> None:
        self.events.append(event)


class Broken:
    def observe(self, event: RequestEvent) -> None:
        raise RuntimeError("observer bug")


async def test_events_describe_pins_versions_errors_and_hangups(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("us-east-1", "us-east", "v47", tokens_per_second=10,
                          completion_tokens=30)
    recorder = Recorder()
    proxy = await start_proxy([pop], observers=[Broken(), recorder],
                              routing={"pin_wait_ms": 100})
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = {"X-Session-ID": "alice", "traceparent": tp, "X-Request-ID": "r1"}
    async with http.post(f"{proxy.url}/v1/chat/completions?x=1", json=CHAT,
                         headers=headers) as resp:
        assert resp.status == 200  # a failing observer changes nothing for the client
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers={"X-Session-ID": "alice"}) as resp:
        assert resp.status == 200
    first, second = recorder.events
    assert (first.request_id, first.trace_id, first.session_id) == (
        "r1", "0af7651916cd43dd8448eb211c80319c", "alice")
    assert (first.method, first.path, first.status) == ("POST", "/v1/chat/completions", 200)
    assert (first.backend_id, first.region, first.version_key) == (
        "us-east-1", "us-east", "prompt=v47")
    assert first.prompt_version == "v47"
    assert first.new_pin is True
    assert second.new_pin is False
    assert first.error_type is None
    assert first.ttfb_s is not None
    assert first.duration_s >= first.ttfb_s
    assert first.streamed is False
    assert abs(first.at - time.time()) < 60

    # A 503 for the pinned version is an event too, naming the version it waited for.
    pop.flip(VersionBundle(prompt="v48"))
    deadline = time.monotonic() + 5
    while proxy.registry.snapshot.by_id["us-east-1"].version_key != "prompt=v48":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers={"X-Session-ID": "alice"}) as resp:
        assert resp.status == 503
    failed = recorder.events[-1]
    assert (failed.status, failed.error_type) == (503, "version_unavailable")
    assert failed.version_key == "prompt=v47"
    assert failed.backend_id is None

    # A client that hangs up mid-stream is recorded as 499.
    resp = await http.post(f"{proxy.url}/v1/chat/completions", json=CHAT | {"stream": True},
                           headers={"X-Session-ID": "bob"})
    await resp.content.readline()
    resp.close()
    deadline = time.monotonic() + 5
    while len(recorder.events) < 4:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    hung_up = recorder.events[-1]
    assert (hung_up.status, hung_up.session_id, hung_up.streamed) == (499, "bob", True)
    assert hung_up.version_key == "prompt=v48"
