"""The data port's HTTP server (h1_server.py) on real loopback sockets, with small
handlers: pipelining, flow control both ways, keep-alive, and shutdown's drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from proxy.dataplane.edge_options import EdgeOptions
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.h1_server import H1Server
from proxy.telemetry.metrics import ProxyMetrics

Handler = Callable[[Exchange], Awaitable[None]]
Serve = Callable[..., Awaitable[tuple[H1Server, int]]]


def _options(**changes: Any) -> EdgeOptions:
    base: dict[str, Any] = dict(
        name="data", head_timeout_s=5.0, keepalive_timeout_s=60.0, max_connections=100,
        max_connections_per_ip=0, retry_after_s=1, max_head_bytes=64 * 1024,
        max_body_bytes=64 * 1024 * 1024, server_header="")
    return EdgeOptions(**(base | changes))


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[H1Server] = []

    async def start(handler: Handler, **options: Any) -> tuple[H1Server, int]:
        server = H1Server(handler, options=_options(**options),
                          metrics=ProxyMetrics(CollectorRegistry()))
        await server.listen("127.0.0.1", 0, reuse_port=False, backlog=16)
        servers.append(server)
        return server, int(server.addresses[0][1])

    yield start
    for server in servers:
        await server.shutdown(1.0)


async def _read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await asyncio.wait_for(reader.readexactly(length), 10)


async def test_pipelined_requests_are_answered_in_order_even_when_the_first_is_slowest(
    serve: Serve,
) -> None:
    async def handler(exchange: Exchange) -> None:
        # The first request takes longest: its answer must still come first.
        await asyncio.sleep(0) if exchange.target != "/0" else await asyncio.sleep(0.05)
        body = bytearray()
        while piece := await exchange.read_chunk():
            body += piece
        await exchange.respond(200, [], exchange.target.encode() + b":" + bytes(body))

    _server, port = await serve(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(
            b"POST /%d HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n%d" % (i, i)
            for i in range(5)))
        bodies = [(await _read_answer(reader))[1] for _ in range(5)]
    finally:
        writer.close()
    assert bodies == [b"/%d:%d" % (i, i) for i in range(5)]


async def test_a_client_that_stops_reading_a_stream_pauses_the_writer_and_loses_nothing(
    serve: Serve,
) -> None:
    piece = b"data: " + b"x" * 16 * 1024 + b"\n\n"
    count = 400  # ~6.5 MB: far more than the socket buffers hold
    done = asyncio.Event()

    async def handler(exchange: Exchange) -> None:
        await exchange.start(200, [("Content-Type", "text/event-stream")])
        for _ in range(count):
            await exchange.write(piece)
        await exchange.finish()
        done.set()

    server, port = await serve(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
    try:
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"Transfer-Encoding: chunked" in head
        # Not reading: the writer must wait for the socket rather than buffer it all.
        connection = next(iter(server.connections))
        for _ in range(200):
            if connection.write_paused:
                break
            await asyncio.sleep(0.01)
        assert connection.write_paused
        assert not done.is_set()
        received = 0
        while True:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
            size = int(size_line.strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
            received += size
        assert received == len(piece) * count
        await asyncio.wait_for(done.wait(), 5)
    finally:
        writer.close()


async def test_http_1_0_gets_its_answer_and_the_connection_closes(serve: Serve) -> None:
    async def handler(exchange: Exchange) -> None:
        await exchange.start(200, [])
        await exchange.write(b"streamed")
        await exchange.finish()

    _server, port = await serve(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /old HTTP/1.0\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    assert b"chunked" not in head
    assert body == b"streamed"


async def test_shutdown_closes_idle_connections_and_lets_an_answer_in_flight_finish(
    serve: Serve,
) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(exchange: Exchange) -> None:
        if exchange.target == "/slow":
            started.set()
            await release.wait()
        await exchange.respond(200, [], b"ok")

    server, port = await serve(handler)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_writer.write(b"GET /fast HTTP/1.1\r\n\r\n")
    await _read_answer(idle_reader)
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
    busy_writer.write(b"GET /slow HTTP/1.1\r\n\r\n")
    await asyncio.wait_for(started.wait(), 5)
    stopping = asyncio.create_task(server.shutdown(10))
    try:
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # idle: closed at once
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
        assert not stopping.done()
        release.set()
        head, body = await _read_answer(busy_reader)
        assert body == b"ok"
        assert b"Connection: close" in head
        await asyncio.wait_for(stopping, 5)
    finally:
        idle_writer.close()
        busy_writer.close()


async def test_a_refusal_reaches_a_client_still_sending_instead_of_a_reset(
    serve: Serve,
) -> None:
    """413 up front while the client's body is still in flight: the answer must arrive
    whole and the connection end with a FIN, not a reset that would discard it."""

    async def handler(exchange: Exchange) -> None:
        raise AssertionError("a refused request is never handled")

    _server, port = await serve(handler, max_body_bytes=1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = b"x" * 512 * 1024
        writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"request_body_too_large" in answer
