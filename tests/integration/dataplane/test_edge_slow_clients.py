"""Slow and greedy clients over real sockets: the head deadline, the keep-alive idle
timeout and the connection caps (proxy/dataplane/listener.py)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.sim import StartPop

HEAD = b"GET /anything/slow HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * 64 + b"\r\n\r\n"


def _port(proxy: RunningProxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


async def _answer(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), timeout)


async def _hold(host: str, port: int, count: int, path: str
                ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` keep-alive connections, each admitted: a request on it was answered 200."""
    held = [await asyncio.open_connection(host, port) for _ in range(count)]
    for reader, writer in held:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 "), head
    return held


def _json_error(answer: bytes) -> tuple[bytes, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    error: dict[str, Any] = json.loads(body)["error"]
    return head, error


async def test_slow_heads_are_closed_by_the_deadline_while_normal_requests_succeed(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    deadline_s, margin_s = 1.0, 4.0
    pop = await start_pop()
    proxy = await start_proxy([pop], listen={"request_head_timeout_s": deadline_s})
    port = _port(proxy)
    closed_after: list[float] = []
    answers: list[bytes] = []

    async def slowloris(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened = time.monotonic()

        async def trickle() -> None:
            # One byte a second (the load of the attack, not synchronisation); the
            # silent tenth of them send nothing at all.
            for byte in HEAD[: 0 if index % 10 == 0 else len(HEAD)]:
                writer.write(bytes([byte]))
                await asyncio.sleep(1.0)

        sender = asyncio.create_task(trickle())
        try:
            answers.append(await _answer(reader, deadline_s + margin_s))
            closed_after.append(time.monotonic() - opened)
        finally:
            sender.cancel()
            writer.close()

    async def normal() -> float:
        started = time.monotonic()
        async with http.get(f"{proxy.url}/anything/normal") as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()
        return time.monotonic() - started

    await normal()  # the proxy and its pool are warm before the slow heads arrive
    pop.reset()
    slow = [asyncio.create_task(slowloris(i)) for i in range(200)]
    ok = 0
    latencies: list[float] = []
    while not all(task.done() for task in slow):
        latencies.append(await normal())
        ok += 1
    await asyncio.gather(*slow)

    assert len(closed_after) == 200
    assert max(closed_after) <= deadline_s + margin_s
    assert min(closed_after) >= deadline_s * 0.9  # the deadline, not some other timeout
    for answer in answers:
        head, error = _json_error(answer)
        assert head.startswith(b"HTTP/1.1 408 "), answer
        assert error["code"] == "request_head_timeout"
    assert ok >= 5  # normal traffic kept flowing the whole time
    assert proxy.metric("pinproxy_client_timeouts_total", listener="data",
                        phase="request_head") == 200
    assert [r.path for r in pop.requests] == ["/anything/normal"] * ok
    # Normal traffic is not held up by the slow heads: none of its requests waited anything
    # like the head deadline (a slowloris that stalled the loop, or aiohttp's 1 h
    # keep-alive, would blow through this by seconds). How the p99 compares with an idle
    # proxy is a speed question, measured in bench/, not asserted here.
    assert max(latencies) < deadline_s / 2, sorted(latencies)[-5:]


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    start_pop: StartPop, start_proxy: StartProxy
) -> None:
    idle_s = 1.5
    pop = await start_pop()
    # The head deadline is shorter: it must not cut an idle connection between requests.
    proxy = await start_proxy([pop], listen={"keepalive_timeout_s": idle_s,
                                             "request_head_timeout_s": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(proxy))
    try:
        writer.write(b"GET /anything/a HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        answered = time.monotonic()
        rest = await _answer(reader, idle_s + 5)
        idle_for = time.monotonic() - answered
    finally:
        writer.close()
    assert rest == b""  # closed quietly: nothing was pending
    assert idle_s * 0.9 <= idle_for <= idle_s + 3, idle_for


@pytest.mark.parametrize(("cap", "whose"), [
    ("max_connections", "to pinproxy; retry"), ("max_connections_per_ip", "from your address"),
])
async def test_connections_over_a_cap_get_503_and_are_closed(
    cap: str, whose: str, start_pop: StartPop, start_proxy: StartProxy
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], listen={cap: 3})
    port = _port(proxy)
    held = await _hold("127.0.0.1", port, 3, "/anything/held")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /anything/over HTTP/1.1\r\nHost: x\r\n\r\n")
    head, error = _json_error(await _answer(reader, 5))
    writer.close()
    assert head.startswith(b"HTTP/1.1 503 "), head
    assert b"Retry-After: 1" in head
    assert (error["type"], error["code"]) == ("proxy_overloaded", "too_many_connections")
    assert whose in error["message"]
    assert "/anything/over" not in [r.path for r in pop.requests]
    assert proxy.metric("pinproxy_client_connections_refused_total", listener="data",
                        reason=cap) == 1

    # A slot freed is a slot to take.
    held[0][1].close()
    deadline = time.monotonic() + 5
    while True:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /anything/again HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await _answer(reader, 5)
        writer.close()
        if answer.startswith(b"HTTP/1.1 200 ") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    for _reader, held_writer in held[1:]:
        held_writer.close()


async def test_the_admin_listener_has_its_own_connection_cap(
    start_pop: StartPop, start_proxy: StartProxy
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], admin={"max_connections": 1})
    host, port = proxy.admin_url[7:].split(":")
    (first,) = await _hold(host, int(port), 1, "/admin/openapi.json")
    reader, writer = await asyncio.open_connection(host, int(port))
    head, error = _json_error(await _answer(reader, 5))
    writer.close()
    first[1].close()
    assert head.startswith(b"HTTP/1.1 503 "), head
    assert error["code"] == "too_many_connections"
    assert proxy.metric("pinproxy_client_connections_refused_total", listener="admin",
                        reason="max_connections") == 1
