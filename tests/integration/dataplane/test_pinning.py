"""The core promise: a session stays on the version it was first served, over real sockets."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from proxy.core.models import VersionBundle
from proxy.sim import SimPop
from tests.fixtures.proxy import StartProxy
from tests.fixtures.sim import StartPop

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}


async def _ask(
    http: aiohttp.ClientSession, url: str, session: str | None, **extra: object
) -> tuple[int, str | None, str | None, dict[str, object]]:
    headers = {"X-Session-ID": session} if session else {}
    async with http.post(f"{url}/v1/chat/completions", json=CHAT | extra, headers=headers) as r:
        body = await r.json()
        return r.status, r.headers.get("X-Prompt-Version"), r.headers.get("X-Served-By"), body


async def _four_regions(start_pop: StartPop) -> list[SimPop]:
    return [
        await start_pop("us-east-1", "us-east", "v47", ttfb_ms=5),
        await start_pop("eu-west-1", "eu-west", "v47", ttfb_ms=5),
        await start_pop("ap-south-1", "ap-south", "v46", ttfb_ms=5),
        await start_pop("ap-northeast-1", "ap-northeast", "v46", ttfb_ms=5),
    ]


async def _session_survives_latency_shift(
    pops: list[SimPop], url: str, http: aiohttp.ClientSession
) -> None:
    status, pinned, _, _ = await _ask(http, url, "alice")
    assert status == 200
    assert pinned in ("v46", "v47")
    # The other version's POPs become the fastest by far, as when GSLB re-picks.
    for pop in pops:
        pop.state.ttfb_ms = 80.0 if pop.state.version.prompt == pinned else 0.0
    results = [await _ask(http, url, "alice") for _ in range(25)]
    assert {(status, prompt) for status, prompt, _, _ in results} == {(200, pinned)}
    # The answers really came from that version's POPs, and only those saw alice.
    assert all(pinned in str(body["choices"]) for _, _, _, body in results)
    for pop in pops:
        alice = [r for r in pop.requests if r.session_id == "alice"]
        if pop.state.version.prompt != pinned:
            assert alice == []
    served_by = {by for _, _, by, _ in results}
    assert served_by <= {p.state.backend_id for p in pops if p.state.version.prompt == pinned}


async def test_session_never_changes_version_as_latencies_shift(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pops = await _four_regions(start_pop)
    proxy = await start_proxy(pops)
    await _session_survives_latency_shift(pops, proxy.url, http)


async def test_session_never_changes_version_with_redis_pins(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    pops = await _four_regions(start_pop)
    proxy = await start_proxy(pops, redis_url)
    await _session_survives_latency_shift(pops, proxy.url, http)
    pin = await proxy.store.get("alice")
    assert pin is not None
    assert pin.version_key.startswith(f"prompt={(await _ask(http, proxy.url, 'alice'))[1]}")


async def test_new_sessions_follow_latency_and_unpinned_requests_are_not_pinned(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    fast = await start_pop("fast", "r1", "v47", ttfb_ms=0)
    slow = await start_pop("slow", "r2", "v46", ttfb_ms=60)
    proxy = await start_proxy([fast, slow])
    # Let the estimator measure both.
    for _ in range(6):
        await _ask(http, proxy.url, None)
    versions = [(await _ask(http, proxy.url, f"s{i}"))[1] for i in range(20)]
    # Power of two choices over two backends always takes the cheaper one once measured.
    assert versions.count("v47") >= 18
    assert proxy.metric("pinproxy_pins_created_total", version_key="prompt=v47") >= 18
    status, _, _, _ = await _ask(http, proxy.url, None)
    assert status == 200
    assert await proxy.store.get("") is None


async def test_response_headers_name_version_backend_and_region(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("us-east-1", "us-east", "v47", parser="json-v2")
    proxy = await start_proxy([pop])
    async with http.post(
        f"{proxy.url}/v1/chat/completions",
        json=CHAT,
        headers={"X-Session-ID": "s1", "X-Request-ID": "req-123"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Prompt-Version"] == "v47"
        assert resp.headers["X-Served-By"] == "us-east-1"
        assert resp.headers["X-Served-Region"] == "us-east"
        assert resp.headers["X-Request-ID"] == "req-123"
        assert "X-Prompt-Version-Changed" not in resp.headers
    record = pop.requests[-1]
    assert record.pinned_version == "prompt=v47,parser=json-v2"
    assert record.headers["X-Request-ID"] == "req-123"


async def test_sse_chunks_reach_the_client_as_the_backend_sends_them(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("p", "r", "v1", tokens_per_second=10, completion_tokens=6)
    proxy = await start_proxy([pop])
    arrivals: list[float] = []
    completed_at_first_chunk = None
    async with http.post(
        f"{proxy.url}/v1/chat/completions",
        json=CHAT | {"stream": True},
        headers={"X-Session-ID": "s"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if line.startswith(b"data:"):
                arrivals.append(time.monotonic())
                if completed_at_first_chunk is None:
                    completed_at_first_chunk = pop.counters.streams_completed
    # 6 tokens + finish chunk + [DONE]
    assert len(arrivals) == 8
    # The first chunk was with the client while the backend was still generating.
    assert completed_at_first_chunk == 0
    # Tokens are 100 ms apart at the backend; through the proxy they must not bunch up.
    assert arrivals[-2] - arrivals[0] >= 0.3


async def test_client_disconnect_cancels_the_upstream_stream(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("p", "r", "v1", tokens_per_second=10, completion_tokens=50)
    proxy = await start_proxy([pop])
    resp = await http.post(f"{proxy.url}/v1/chat/completions", json=CHAT | {"stream": True})
    await resp.content.readline()
    resp.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 3
    while pop.counters.streams_aborted == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert pop.counters.streams_aborted == 1
    assert pop.counters.streams_completed == 0


async def test_a_flipped_backend_never_answers_a_pinned_session(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    a = await start_pop("a", "us-east", "v47", ttfb_ms=0)
    b = await start_pop("b", "eu-west", "v47", ttfb_ms=40)
    # Polls far apart: the proxy can only learn of the flip from response stamps. A tiny
    # initial estimate makes sure both are measured, so the fast "a" is the choice.
    proxy = await start_proxy(
        [a, b], discovery={"interval_s": 3600}, routing={"initial_latency_ms": 0.001}
    )
    for _ in range(3):
        assert (await _ask(http, proxy.url, "alice"))[1] == "v47"
    assert a.requests, "the fast backend must have been measured and chosen"
    a.flip(VersionBundle(prompt="v46"))  # silently, mid-run
    results = [await _ask(http, proxy.url, "alice") for _ in range(10)]
    assert {(s, v, by) for s, v, by, _ in results} == {(200, "v47", "b")}
    assert all("v46" not in str(body) for *_, body in results)
    # One wrong-version answer was withheld; after it the proxy knows and stops asking a.
    assert (
        proxy.metric(
            "pinproxy_mismatch_guard_triggers_total",
            backend="a",
            pinned_version="prompt=v47",
            stamped_version="prompt=v46",
        )
        == 1
    )
    assert proxy.registry.snapshot.by_id["a"].version_key == "prompt=v46"
    after_flip = [
        r for r in a.requests if r.session_id == "alice" and r.version_key != "prompt=v47"
    ]
    assert len(after_flip) == 1
    # A new session may go to a, and is pinned to what a really serves now.
    a_key_sessions = [(await _ask(http, proxy.url, f"n{i}"))[1] for i in range(10)]
    assert set(a_key_sessions) <= {"v46", "v47"}


async def test_a_strict_backend_refusing_the_pin_is_retried_on_the_right_version(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    a = await start_pop("a", "r1", "v47", ttfb_ms=0, strict=True)
    b = await start_pop("b", "r2", "v47", ttfb_ms=40)
    proxy = await start_proxy(
        [a, b], discovery={"interval_s": 3600}, routing={"initial_latency_ms": 0.001}
    )
    for _ in range(3):
        assert (await _ask(http, proxy.url, "alice"))[1] == "v47"
    a.flip(VersionBundle(prompt="v48"))
    status, version, served_by, _ = await _ask(http, proxy.url, "alice")
    assert (status, version, served_by) == (200, "v47", "b")
    assert [r.pinned_version for r in a.requests][-1] == "prompt=v47"
    assert a.counters.responses.get(409) == 1


async def test_flip_with_no_other_backend_gives_503_not_the_wrong_version(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    a = await start_pop("a", "r1", "v47")
    proxy = await start_proxy([a], discovery={"interval_s": 3600}, routing={"pin_wait_ms": 200})
    assert (await _ask(http, proxy.url, "alice"))[1] == "v47"
    a.flip(VersionBundle(prompt="v46"))
    status, _, _, body = await _ask(http, proxy.url, "alice")
    assert status == 503
    assert body["error"]["type"] == "version_unavailable"  # type: ignore[index]
    assert body["error"]["pinned_version"] == "prompt=v47"  # type: ignore[index]


async def test_a_region_cutting_over_as_a_whole_still_serves_its_sessions_elsewhere(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    # Found by bench/incident: both replicas of a region flip at the same instant; the
    # pinned version is still served by a slower region, so the session must get it.
    north_1 = await start_pop("ap-northeast-1", "ap-northeast", "v46", ttfb_ms=0)
    north_2 = await start_pop("ap-northeast-2", "ap-northeast", "v46", ttfb_ms=0)
    south = await start_pop("ap-south-1", "ap-south", "v46", ttfb_ms=40)
    proxy = await start_proxy([north_1, north_2, south], discovery={"interval_s": 3600},
                              routing={"initial_latency_ms": 0.001})
    for _ in range(6):
        assert (await _ask(http, proxy.url, "alice"))[1] == "v46"
    # Both fast replicas were measured, so they are tried before the slow region.
    assert north_1.requests
    assert north_2.requests
    for pop in (north_1, north_2):
        pop.flip(VersionBundle(prompt="v47"))
    status, version, served_by, body = await _ask(http, proxy.url, "alice")
    assert (status, version, served_by) == (200, "v46", "ap-south-1")
    assert "v47" not in str(body)
    withheld = sum(
        proxy.metric("pinproxy_mismatch_guard_triggers_total", backend=b,
                     pinned_version="prompt=v46", stamped_version="prompt=v47")
        for b in ("ap-northeast-1", "ap-northeast-2")
    )
    assert withheld == 2
