"""Backends failing under pinned traffic, over real sockets (issue 9, section 2).

Each test is one fault an edge proxy meets in production: a POP dying, a backend that
refuses a version it no longer serves, one that fails fast, one that reads a POST and
hangs up, one that writes a stray response, one that restarts with another version at
the same URL. Each asserts on what the clients received, and on what the backends saw.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from proxy.core.models import VersionBundle
from tests.fixtures.proxy import StartProxy
from tests.fixtures.sim import StartPop

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}
V1_ONLY = {"admitted_for_new_sessions": ["v1"]}


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def ask(
    http: aiohttp.ClientSession, url: str, session: str, *, method: str = "POST",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with http.request(
        method, f"{url}/v1/chat/completions", json=CHAT,
        headers={"X-Session-ID": session, **(headers or {})},
    ) as resp:
        text = await resp.text()
        return resp.status, dict(resp.headers), json.loads(text) if text else {}


# --- a POP goes down --------------------------------------------------------------------------


async def test_a_pop_going_down_under_pinned_traffic_never_gives_a_502(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    # a1 is by far the fastest of the version, so latency routing sends the traffic to it
    # until it dies (with POPs close in latency, a loaded machine could leave a1 idle at
    # that moment, and nothing would try it: seen as a1 never marked at all).
    a1 = await start_pop("a1", "r1", "v1", ttfb_ms=0)
    a2 = await start_pop("a2", "r2", "v1", ttfb_ms=150)
    b1 = await start_pop("b1", "r3", "v2")
    # Polls a second apart and three failed polls to turn unhealthy: only the failed
    # requests themselves can tell the proxy in time (passive health).
    proxy = await start_proxy(
        [a1, a2, b1], versions=V1_ONLY, discovery={"interval_s": 1.0, "jitter": 0.0},
        routing={"pin_wait_ms": 300, "retry_after_s": 1},
    )
    sessions = [f"s{i}" for i in range(12)]
    for s in sessions:
        status, headers, _ = await ask(http, proxy.url, s)
        assert (status, headers["X-Prompt-Version"]) == (200, "v1")

    statuses: list[tuple[int, str | None]] = []
    stop = asyncio.Event()

    async def client(session: str) -> None:
        while not stop.is_set():
            status, headers, body = await ask(http, proxy.url, session)
            statuses.append((status, headers.get("X-Prompt-Version")
                             or body.get("error", {}).get("type")))

    clients = [asyncio.create_task(client(s)) for s in sessions]
    await until(lambda: len(statuses) >= 50)
    assert a1.requests, "the traffic never reached a1"
    await a1.stop()  # a POP dies under traffic
    seen = len(statuses)
    await until(lambda: len(statuses) >= seen + 100)
    stop.set()
    await asyncio.gather(*clients)
    # A request the dying POP had already read may have been processed: it is not
    # replayed (a POST), and is answered 503 upstream_dropped, never a 502.
    assert {s for s in statuses if s[0] != 200} <= {(503, "upstream_error")}
    assert {v for status, v in statuses if status == 200} == {"v1"}
    assert sum(1 for s in statuses if s[0] != 200) <= len(sessions)
    # Whether a refused connect was retried here, or the POP's in-flight drop marked it
    # suspect before any request tried to connect, depends on timing under load; the
    # retry itself is pinned deterministically by
    # test_availability.py::test_refused_connection_is_retried_once_on_the_same_version.
    # Out of rotation at once, not after three failed polls a second apart: suspect when a
    # connection to it was refused or a fresh one reset, or ejected as an outlier when the
    # requests it had already read dropped on pooled connections (which alone may be a
    # benign keep-alive race, so they count as failures rather than as a verdict).
    a1_state = proxy.registry.snapshot.by_id["a1"]
    assert not a1_state.healthy or a1_state.ejected_until > time.time(), (
        a1_state, proxy.registry.health_history("a1"))

    # The version's last POP dies too: each session waits pin_wait_ms, then 503.
    await a2.stop()
    results = await asyncio.gather(*(ask(http, proxy.url, s) for s in sessions))
    for status, headers, body in results:
        assert status == 503, body
        assert body["error"]["type"] == "version_unavailable"
        assert body["error"]["pinned_version"] == "prompt=v1"
        assert headers["Retry-After"] == "1"
    assert b1.requests == [], "a pinned v1 session reached v2"


async def test_a_pinned_session_is_served_again_once_its_pop_is_back(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    a1 = await start_pop("a1", "r1", "v1")
    b1 = await start_pop("b1", "r2", "v2")
    proxy = await start_proxy([a1, b1], versions=V1_ONLY,
                              discovery={"interval_s": 0.2, "unhealthy_after": 50})
    assert (await ask(http, proxy.url, "s"))[0] == 200
    port = a1.port
    await a1.stop()
    status, _, body = await ask(http, proxy.url, "s")
    assert (status, body["error"]["type"]) == (503, "version_unavailable")
    assert not proxy.registry.snapshot.by_id["a1"].healthy  # passive, not 50 failed polls
    await a1.start(port=port)
    # Readmitted by a fresh /version poll, not by the next request trying its luck.
    await until(lambda: proxy.registry.snapshot.by_id["a1"].healthy)
    status, headers, _ = await ask(http, proxy.url, "s")
    assert (status, headers["X-Prompt-Version"]) == (200, "v1")


# --- a cooperating backend refuses --------------------------------------------------------------


async def test_a_refusal_of_the_pinned_version_is_never_relayed(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    # Neither backend stamps its answers; both refuse a request pinned to a version
    # they do not serve (README: cooperating backends answer 409).
    # a2 is the faster, so latency routing prefers it until it refuses.
    a1 = await start_pop("a1", "r1", "v1", stamp=False, strict=True, ttfb_ms=30)
    a2 = await start_pop("a2", "r2", "v1", stamp=False, strict=True)
    proxy = await start_proxy([a1, a2], discovery={"interval_s": 3600},
                              routing={"initial_latency_ms": 1})
    sessions = [f"s{i}" for i in range(10)]
    served = [(await ask(http, proxy.url, s))[1]["X-Served-By"] for s in sessions]
    assert "a2" in served
    a2.flip(VersionBundle(prompt="v2"))  # silently: no poll will tell for an hour
    answers = [await ask(http, proxy.url, s) for s in sessions * 3]
    assert [(status, h["X-Prompt-Version"]) for status, h, _ in answers] == [(200, "v1")] * 30
    assert {h["X-Served-By"] for _, h, _ in answers} == {"a1"}
    # The refusal re-polled a2 at once: the proxy now knows what it runs.
    await until(lambda: proxy.registry.snapshot.by_id["a2"].version_key == "prompt=v2")
    assert proxy.metric("pinproxy_upstream_refusals_total", backend="a2",
                        pinned_version="prompt=v1") >= 1


# --- a backend that fails fast ----------------------------------------------------------------


async def test_a_backend_that_fails_fast_does_not_attract_pinned_traffic(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    broken = await start_pop("broken", "r1", "v1", fail_status=500)
    slow = await start_pop("slow", "r2", "v1", ttfb_ms=20)
    proxy = await start_proxy([broken, slow])
    answers = [await ask(http, proxy.url, f"s{i % 6}") for i in range(60)]
    served_by_broken = sum(1 for _, h, _ in answers if h.get("X-Served-By") == "broken")
    assert served_by_broken <= 5, f"the failing backend took {served_by_broken} of 60"
    assert all(h["X-Prompt-Version"] == "v1" for _, h, _ in answers)


async def test_consecutive_5xx_eject_a_backend_within_the_versions_share(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    broken = await start_pop("broken", "r1", "v1", fail_status=503)
    other = await start_pop("other", "r2", "v1")
    proxy = await start_proxy(
        [broken, other], routing={"outlier": {"consecutive_failures": 3}},
    )
    # Draining takes "other" out of unpinned traffic: these go to the broken one.
    proxy.registry.set_draining("other", True)
    for _ in range(3):
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 503  # the backend's own error, relayed
    await until(lambda: proxy.registry.snapshot.by_id["broken"].ejected_until > time.time())
    assert proxy.metric("pinproxy_outlier_ejections_total", backend="broken", region="r1") == 1
    # Ejected: a pinned session of v1 is served by the version's other backend.
    proxy.registry.set_draining("other", False)
    for i in range(5):
        status, headers, _ = await ask(http, proxy.url, f"p{i}")
        assert (status, headers["X-Served-By"]) == (200, "other")


async def test_the_last_backend_of_a_version_is_never_ejected(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    only = await start_pop("only", "r1", "v1", fail_status=500)
    proxy = await start_proxy([only], routing={"outlier": {"consecutive_failures": 2}})
    for _ in range(4):
        status, _, _ = await ask(http, proxy.url, "s")
        assert status == 500  # its own answer, not a 503 made up by the proxy
    assert proxy.registry.snapshot.by_id["only"].ejected_until == 0.0


# --- a POST is never sent twice ----------------------------------------------------------------


class HangUp:
    """A raw backend: /version answers v1; every other request is read, then dropped."""

    def __init__(self, mode: str = "hang-up") -> None:
        self.mode = mode
        self.api_requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                if head.startswith(b"GET /version "):
                    self._send(writer, b'{"prompt": "v1"}', close=True)
                    return
                self.api_requests.append(head.split(b"\r\n", 1)[0])
                if self.mode == "hang-up":
                    return  # read it all, answer nothing (finally closes)
                # "stray": answer after a generation's time, then a second response.
                await asyncio.sleep(0.1)
                self._send(writer, b'{"ok": true}')
                await asyncio.sleep(0.05)
                self._send(writer, b'{"stray": true}')
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _send(writer: asyncio.StreamWriter, body: bytes, *, close: bool = False) -> None:
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + (b"\r\nConnection: close" if close else b"")
                + b"\r\n\r\n")
        writer.write(head + body)


StartRaw = Callable[[str], Awaitable[tuple[HangUp, str]]]


@pytest_asyncio.fixture
async def start_raw() -> AsyncIterator[StartRaw]:
    servers: list[tuple[asyncio.Server, HangUp]] = []

    async def start(mode: str) -> tuple[HangUp, str]:
        backend = HangUp(mode)
        server = await asyncio.start_server(backend.serve, "127.0.0.1", 0)
        servers.append((server, backend))
        return backend, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server, backend in servers:
        for writer in backend.writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def hang_ups(
    start_raw: StartRaw, start_proxy: StartProxy, **sections: dict[str, Any]
) -> tuple[HangUp, HangUp, Any]:
    """Two v1 backends that read every request and hang up, behind a proxy."""
    one, one_url = await start_raw("hang-up")
    two, two_url = await start_raw("hang-up")
    proxy = await start_proxy([], backends=[
        {"id": "one", "region": "r1", "url": one_url},
        {"id": "two", "region": "r2", "url": two_url},
    ], **sections)
    return one, two, proxy


async def test_a_post_the_backend_read_and_dropped_is_never_sent_again(
    start_raw: StartRaw, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    one, two, proxy = await hang_ups(start_raw, start_proxy)
    status, headers, body = await ask(http, proxy.url, "s")
    assert (status, body["error"]["code"]) == (503, "upstream_dropped")
    assert headers["Retry-After"] == "1"  # routing.retry_after_s of the test proxy
    assert len(one.api_requests) + len(two.api_requests) == 1, "a POST was replayed"
    assert proxy.metric("pinproxy_upstream_retries_total", reason="dropped") == 0


async def test_an_idempotent_request_is_replayed_a_bounded_number_of_times(
    start_raw: StartRaw, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    one, two, proxy = await hang_ups(
        start_raw, start_proxy, routing={"max_attempts": 3, "pin_wait_ms": 200}
    )
    status, _, body = await ask(http, proxy.url, "s", headers={"Idempotency-Key": "k1"})
    assert status == 503, body
    sent = len(one.api_requests) + len(two.api_requests)
    assert 2 <= sent <= 3
    assert proxy.metric("pinproxy_upstream_retries_total", reason="dropped") == sent - 1


async def test_a_pop_that_dies_with_a_request_in_flight_leaves_rotation_at_once(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    # The race the POP-going-down test meets only sometimes, made certain: a POP answers
    # one request on a kept-alive connection, then dies while reading the next one on
    # it (stops listening, hangs up). A drop on a pooled connection is not a verdict
    # alone (a keep-alive race looks the same), so the proxy asks at once, out of turn:
    # the probe's refused connection marks the POP suspect. No poll could tell: they
    # are an hour apart.
    server: asyncio.Server | None = None
    api_requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if head.startswith(b"GET /version "):
                    HangUp._send(writer, b'{"prompt": "v1"}', close=True)
                    return
                api_requests.append(head)
                if len(api_requests) > 1:
                    assert server is not None
                    server.close()  # the POP is gone: nothing listens any more
                    return
                HangUp._send(writer, b'{"ok": true}')
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        proxy = await start_proxy([], backends=[{"id": "dying", "region": "r1", "url": url}],
                                  discovery={"interval_s": 3600},
                                  # reuse the kept-alive connection at once
                                  upstream={"reuse_quiet_ms": 0})
        assert (await ask(http, proxy.url, "s"))[0] == 200
        status, _, body = await ask(http, proxy.url, "s")
        assert (status, body["error"]["code"]) == (503, "upstream_dropped")
        assert len(api_requests) == 2, "the POST was replayed"
        await until(lambda: not proxy.registry.snapshot.by_id["dying"].healthy)
        healthy, why = proxy.registry.health_history("dying")[-1][1:]
        assert (healthy, why.startswith("passive: probe refused")) == (False, True), why
    finally:
        server.close()
        await server.wait_closed()


# --- a stray response -------------------------------------------------------------------------


async def test_a_stray_response_never_reaches_the_next_client(
    start_raw: StartRaw, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    backend, url = await start_raw("stray")
    proxy = await start_proxy([], backends=[{"id": "stray", "region": "r1", "url": url}])
    bodies = [(await ask(http, proxy.url, f"user-{i}"))[2] for i in range(10)]
    assert bodies == [{"ok": True}] * 10
    assert len(backend.api_requests) == 10


# --- a backend restarts with another version at the same URL ----------------------------------


async def test_a_backend_restarted_with_another_version_is_repolled_before_pinned_traffic(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    a1 = await start_pop("a1", "r1", "v1", stamp=False)
    proxy = await start_proxy([a1], discovery={"interval_s": 0.3, "unhealthy_after": 50})
    assert (await ask(http, proxy.url, "s"))[1]["X-Prompt-Version"] == "v1"
    port = a1.port
    await a1.stop()
    assert (await ask(http, proxy.url, "s"))[0] == 503  # refused: suspect at once
    # The same URL comes back running v2, and does not stamp its answers.
    a1.flip(VersionBundle(prompt="v2"))
    await a1.start(port=port)
    before = len(a1.requests)
    await until(lambda: proxy.registry.snapshot.by_id["a1"].healthy)
    assert proxy.registry.snapshot.by_id["a1"].version_key == "prompt=v2"
    status, _, body = await ask(http, proxy.url, "s")
    assert (status, body["error"]["type"]) == (503, "version_unavailable")
    assert [r for r in a1.requests[before:] if r.session_id == "s"] == []
