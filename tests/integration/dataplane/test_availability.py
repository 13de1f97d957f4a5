"""When the pinned version has no backend: wait, then 503; recover; retire only when gone."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from multidict import CIMultiDict

from proxy.core.models import VersionBundle
from tests.fixtures.proxy import StartProxy
from tests.fixtures.sim import StartPop

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}


async def _ask(
    http: aiohttp.ClientSession, url: str, session: str
) -> tuple[int, CIMultiDict[str], dict[str, Any]]:
    async with http.post(
        f"{url}/v1/chat/completions", json=CHAT, headers={"X-Session-ID": session}
    ) as resp:
        return resp.status, resp.headers.copy(), await resp.json()


async def _until(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_pinned_version_down_gives_503_after_pin_wait_and_recovers(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    old = await start_pop("ap-south-1", "ap-south", "v46")
    new = await start_pop("us-east-1", "us-east", "v47")
    proxy = await start_proxy(
        [old, new],
        routing={"pin_wait_ms": 400, "retry_after_s": 3},
        versions={"admitted_for_new_sessions": ["v46"]},
    )
    status, headers, _ = await _ask(http, proxy.url, "alice")
    assert (status, headers["X-Prompt-Version"]) == (200, "v46")

    port = old.port
    await old.stop()
    await _until(lambda: not proxy.registry.snapshot.by_id["ap-south-1"].healthy)

    started = time.monotonic()
    status, headers, body = await _ask(http, proxy.url, "alice")
    waited = time.monotonic() - started
    assert status == 503
    assert headers["Retry-After"] == "3"
    assert body == {
        "error": {
            "message": body["error"]["message"],
            "type": "version_unavailable",
            "param": None,
            "code": "version_unavailable",
            "pinned_version": "prompt=v46",
        }
    }
    assert waited >= 0.35  # it waited pin_wait_ms for the version to come back
    assert [r for r in new.requests if r.session_id == "alice"] == []
    assert (
        proxy.metric("pinproxy_version_unavailable_responses_total", version_key="prompt=v46") == 1
    )

    await old.start(port=port)
    await _until(lambda: proxy.registry.snapshot.by_id["ap-south-1"].healthy)
    status, headers, _ = await _ask(http, proxy.url, "alice")
    assert (status, headers["X-Prompt-Version"]) == (200, "v46")


async def test_a_cutover_shorter_than_pin_wait_is_invisible_to_the_session(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("eu-west-1", "eu-west", "v47")
    proxy = await start_proxy(
        [pop], routing={"pin_wait_ms": 5000}, discovery={"unhealthy_after": 1, "healthy_after": 1}
    )
    assert (await _ask(http, proxy.url, "alice"))[0] == 200
    port = pop.port
    await pop.stop()
    await _until(lambda: not proxy.registry.snapshot.by_id["eu-west-1"].healthy)

    pending = asyncio.create_task(_ask(http, proxy.url, "alice"))
    await asyncio.sleep(0.3)
    assert not pending.done()  # held, not failed
    await pop.start(port=port)
    status, headers, _ = await asyncio.wait_for(pending, 5)
    assert (status, headers["X-Prompt-Version"]) == (200, "v47")


async def test_a_retired_version_repins_the_session_explicitly(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("us-east-1", "us-east", "v46")
    proxy = await start_proxy([pop], versions={"retire_after_s": 0.5}, routing={"pin_wait_ms": 100})
    assert (await _ask(http, proxy.url, "alice"))[1]["X-Prompt-Version"] == "v46"
    # The region finishes its cutover: nobody reports v46 any more.
    pop.flip(VersionBundle(prompt="v47"))
    await _until(lambda: proxy.registry.snapshot.by_id["us-east-1"].version_key == "prompt=v47")
    # Before retire_after the session is refused, never silently moved.
    status, _, body = await _ask(http, proxy.url, "alice")
    assert status == 503
    assert body["error"]["type"] == "version_unavailable"

    # Refused (and never moved) until retire_after_s has passed, then repinned.
    deadline = time.monotonic() + 5
    while status == 503:
        assert time.monotonic() < deadline, "never repinned"
        await asyncio.sleep(0.05)
        status, headers, body = await _ask(http, proxy.url, "alice")
        assert status == 200 or body["error"]["type"] == "version_unavailable"
    assert status == 200
    assert headers["X-Prompt-Version"] == "v47"
    assert headers["X-Prompt-Version-Changed"] == "prompt=v46 -> prompt=v47"
    assert (
        proxy.metric(
            "pinproxy_session_version_switches_total",
            reason="retired",
            from_version="prompt=v46",
            to_version="prompt=v47",
        )
        == 1
    )
    # The change is made once; the session is now simply pinned to v47.
    status, headers, _ = await _ask(http, proxy.url, "alice")
    assert (status, headers["X-Prompt-Version"]) == (200, "v47")
    assert "X-Prompt-Version-Changed" not in headers
    pin = await proxy.store.get("alice")
    assert pin is not None
    assert pin.version_key == "prompt=v47"


async def test_refused_connection_is_retried_once_on_the_same_version(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    a = await start_pop("a", "r1", "v47", ttfb_ms=0)
    b = await start_pop("b", "r2", "v47", ttfb_ms=30)
    other = await start_pop("c", "r3", "v46", ttfb_ms=0)
    proxy = await start_proxy(
        [a, b, other],
        discovery={"interval_s": 3600},
        routing={"initial_latency_ms": 0.001},
        versions={"admitted_for_new_sessions": ["v47"]},
    )
    for _ in range(3):
        assert (await _ask(http, proxy.url, "alice"))[0] == 200
    await a.stop()  # the proxy has not polled since; it learns on the next request
    status, headers, _ = await _ask(http, proxy.url, "alice")
    assert (status, headers["X-Prompt-Version"], headers["X-Served-By"]) == (200, "v47", "b")
    assert other.requests == []
    assert proxy.metric("pinproxy_upstream_retries_total", reason="connect") >= 1
