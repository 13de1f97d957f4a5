"""Bad input and failures over real sockets: every refusal is an OpenAI-shaped JSON error,
nothing refused reaches a backend, and no traceback ever reaches a client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.fixtures.proxy import RunningProxy, StartProxy, free_port
from tests.fixtures.raw_http import port_of, send_raw
from tests.fixtures.sim import StartPop

CHAT: dict[str, Any] = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}


async def _error(resp: aiohttp.ClientResponse, status: int, error_type: str,
                 code: str | None) -> dict[str, Any]:
    """Assert ``resp`` is the OpenAI error shape; return its ``error`` object."""
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == "application/json", text
    assert "Traceback" not in text
    error: dict[str, Any] = json.loads(text)["error"]
    assert isinstance(error["message"], str)
    assert error["message"]
    assert (error["type"], error["code"]) == (error_type, code)
    assert "param" in error
    return error


async def _raw(proxy: RunningProxy, data: bytes) -> bytes:
    return await send_raw(port_of(proxy.url), data)


# --- session ids --------------------------------------------------------------------------


async def test_a_session_id_over_256_bytes_is_refused_before_any_backend_sees_it(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    long_id = "s" * 257
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers={"X-Session-ID": long_id, "X-Request-ID": "req-long"}) as resp:
        error = await _error(resp, 400, "invalid_request_error", "invalid_session_id")
        assert resp.headers["X-Request-ID"] == "req-long"
    assert long_id not in error["message"]  # never echoed back
    assert pop.requests == []
    assert pop.counters.requests == 0

    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers={"X-Session-ID": "s" * 256}) as resp:
        assert resp.status == 200, await resp.text()
    assert [r.session_id for r in pop.requests] == ["s" * 256]


@pytest.mark.parametrize("session_id", ["abc\x01def", "tab\there", "del\x7f", "c1\x85", "nl\n"])
async def test_a_control_character_in_a_body_session_id_is_refused(
    session_id: str, start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    body = CHAT | {"metadata": {"session_id": session_id}}
    async with http.post(f"{proxy.url}/v1/chat/completions", json=body) as resp:
        await _error(resp, 400, "invalid_request_error", "invalid_session_id")
    assert pop.requests == []


async def test_the_limit_counts_utf8_bytes_not_characters(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    url = f"{proxy.url}/v1/chat/completions"
    async with http.post(url, json=CHAT | {"metadata": {"session_id": "é" * 128}}) as resp:
        assert resp.status == 200, await resp.text()  # 128 characters, 256 bytes
    async with http.post(url, json=CHAT | {"metadata": {"session_id": "é" * 129}}) as resp:
        await _error(resp, 400, "invalid_request_error", "invalid_session_id")
    assert len(pop.requests) == 1


async def test_a_header_session_id_that_is_not_utf8_is_refused(
    start_pop: StartPop, start_proxy: StartProxy
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    raw = await _raw(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                            b"X-Session-ID: caf\xe9\r\nContent-Length: 2\r\n"
                            b"Connection: close\r\n\r\n{}")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), raw
    assert json.loads(body)["error"]["code"] == "invalid_session_id"
    assert pop.requests == []


async def test_a_required_session_id_that_is_missing_gives_400(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], sessions={"required": True})
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as resp:
        await _error(resp, 400, "invalid_request_error", "missing_session_id")
    async with http.get(f"{proxy.url}/anything", headers={"X-Session-ID": ""}) as resp:
        await _error(resp, 400, "invalid_request_error", "missing_session_id")
    assert pop.requests == []
    body = CHAT | {"metadata": {"session_id": 42}}
    async with http.post(f"{proxy.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
    assert [r.session_id for r in pop.requests] == [None]  # the id came from the body
    assert await proxy.store.get("42") is not None


# --- no backend -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none_configured", "unreachable", "died_after_start"])
async def test_no_backend_reachable_gives_503_with_retry_after(
    kind: str, start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    routing = {"pin_wait_ms": 150, "retry_after_s": 3}
    if kind == "none_configured":
        proxy = await start_proxy([], routing=routing)
    elif kind == "unreachable":
        dead = [{"id": "dead", "region": "r1", "url": f"http://127.0.0.1:{free_port()}"}]
        proxy = await start_proxy([], routing=routing, backends=dead)
    else:
        pop = await start_pop()
        # Polls far apart: only the failed request itself can tell the proxy.
        proxy = await start_proxy([pop], routing=routing, discovery={"interval_s": 3600})
        await pop.stop()
    started = time.monotonic()
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as resp:
        await _error(resp, 503, "no_backends", "no_backends")
        assert resp.headers["Retry-After"] == "3"
    assert time.monotonic() - started < 2.0  # waited about pin_wait_ms, not forever
    if kind == "died_after_start":
        # The refused connection marked the backend suspect at once (passive health),
        # so a new session is not pinned to a backend known to be down.
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                             headers={"X-Session-ID": "s1"}) as resp:
            error = await _error(resp, 503, "no_backends", "no_backends")
            assert resp.headers["Retry-After"] == "3"
        assert "pinned_version" not in error


class RawBackend:
    """Answers /version properly; every other request with garbage or with silence."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.api_requests = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        if head.startswith(b"GET /version "):
            body = b'{"prompt": "v1"}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            writer.close()
            return
        self.api_requests += 1
        if self.mode == "garbage":
            writer.write(b"this is not HTTP at all\r\n\r\n")
            writer.close()
        # "silent": keep the connection open and say nothing


@pytest_asyncio.fixture
async def raw_backend(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RawBackend, str]]:
    backend = RawBackend(request.param)
    server = await asyncio.start_server(backend.serve, "127.0.0.1", 0)
    yield backend, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for writer in backend.writers:
        writer.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(("raw_backend", "status", "error_type"), [
    ("garbage", 502, "upstream_error"), ("silent", 504, "upstream_timeout"),
], indirect=["raw_backend"])
async def test_a_broken_backend_gives_a_json_gateway_error(
    raw_backend: tuple[RawBackend, str], status: int, error_type: str,
    start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    backend, url = raw_backend
    proxy = await start_proxy([], backends=[{"id": "raw", "region": "r1", "url": url}],
                              upstream={"read_idle_timeout_s": 0.3})
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as resp:
        await _error(resp, status, error_type, error_type)
    assert backend.api_requests == 1  # a backend that answered is not asked twice


# --- no traceback, ever -----------------------------------------------------------------


async def test_an_unexpected_exception_becomes_a_json_500_without_details(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])

    async def boom(*args: object) -> None:
        raise RuntimeError("secret-internal-detail")

    monkeypatch.setattr(proxy.services.dataplane, "_proxy", boom)
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as resp:
        error = await _error(resp, 500, "internal_error", "internal_error")
    assert "secret-internal-detail" not in error["message"]
    monkeypatch.undo()
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200  # and the proxy is fine afterwards


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    b"GET /x\x00y HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /x HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    # Request smuggling: both framings, with a second request hidden in the body.
    b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
])
async def test_malformed_requests_get_a_4xx_without_traceback_and_reach_no_backend(
    raw: bytes, start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    answer = await _raw(proxy, raw)
    assert answer.startswith((b"HTTP/1.0 4", b"HTTP/1.1 4")), answer
    assert b"Traceback" not in answer
    assert b'File "' not in answer
    assert pop.requests == []
    async with http.get(f"{proxy.url}/anything/after") as resp:
        assert resp.status == 200
    assert [r.path for r in pop.requests] == ["/anything/after"]


@pytest.mark.parametrize("method", ["OPTIONS", "CONNECT"])
async def test_asterisk_and_authority_form_are_answered_locally_as_json(
    method: str, start_pop: StartPop, start_proxy: StartProxy
) -> None:
    connections: list[int] = []

    async def on_connect(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()

    decoy = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    where = f"127.0.0.1:{decoy.sockets[0].getsockname()[1]}".encode()
    pop = await start_pop()
    proxy = await start_proxy([pop])
    target = b"*" if method == "OPTIONS" else where  # CONNECT must open no tunnel
    try:
        answer = await _raw(proxy, method.encode() + b" " + target + b" HTTP/1.1\r\nHost: "
                            + where + b"\r\nConnection: close\r\n\r\n")
    finally:
        decoy.close()
        await decoy.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404"), answer
    error = json.loads(body)["error"]
    assert error["message"]
    assert error["type"] == "invalid_request_error"
    assert pop.requests == []
    assert connections == []


# --- a client hanging up ------------------------------------------------------------------


async def test_a_client_hanging_up_before_the_head_leaves_no_phantom_load(
    start_pop: StartPop, start_proxy: StartProxy
) -> None:
    pop = await start_pop("p", "r1", "v1", ttfb_ms=400)
    proxy = await start_proxy([pop])
    loads = proxy.services.loads
    _reader, writer = await asyncio.open_connection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))
    writer.write(b"GET /anything/slow HTTP/1.1\r\nHost: x\r\n\r\n")
    deadline = time.monotonic() + 3
    while not pop.requests and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert loads.inflight("p") == 1  # sent upstream, waiting for the head
    writer.close()  # the client gives up
    await pop.wait_idle()
    deadline = time.monotonic() + 1
    while loads.inflight("p") and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert loads.inflight("p") == 0
