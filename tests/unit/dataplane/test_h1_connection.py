"""H1Connection driven byte by byte through a recording transport (no sockets).

The parser callbacks, pipelining order, flow control and refusals are checked on what
the connection writes and on the transport calls it makes; hypothesis splits valid
pipelined streams at arbitrary points and feeds arbitrary bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from proxy.dataplane.edge_options import EdgeOptions
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.h1_connection import H1Connection, Phase
from proxy.dataplane.h1_server import H1Server
from proxy.telemetry.metrics import ProxyMetrics


class FakeTransport:
    """What asyncio gives a protocol, recording what the protocol does with it."""

    def __init__(self, protocol: H1Connection) -> None:
        self.protocol = protocol
        self.written = bytearray()
        self.closed = False
        self.eof_sent = False
        self.reading = True
        self.pauses = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8080)}.get(
            name, default)

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_sent = True

    @property
    def ended(self) -> bool:
        """This side is done: closed, or its FIN sent (lingering for the client's)."""
        return self.closed or self.eof_sent

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True


def _options(**changes: Any) -> EdgeOptions:
    base: dict[str, Any] = dict(
        name="data", head_timeout_s=5.0, keepalive_timeout_s=60.0, max_connections=100,
        max_connections_per_ip=0, retry_after_s=1, max_head_bytes=64 * 1024,
        max_body_bytes=1024 * 1024, server_header="")
    return EdgeOptions(**(base | changes))


Handler = Callable[[Exchange], Awaitable[None]]


async def echo(exchange: Exchange) -> None:
    """Answers each request with its method, target and body."""
    body = bytearray()
    while piece := await exchange.read_chunk():
        body += piece
    await exchange.respond(200, [("X-Target", exchange.target)],
                           exchange.method.encode() + b" " + bytes(body))


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def _connection(handler: Handler = echo, **options: Any) -> tuple[H1Connection, FakeTransport]:
    server = H1Server(handler, options=_options(**options),
                      metrics=ProxyMetrics(CollectorRegistry()))
    conn = server()
    transport = FakeTransport(conn)
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


class _Answers:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.statuses: list[int] = []
        self._body = bytearray()

    def on_status(self, status: bytes) -> None:
        pass

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.bodies.append(bytes(self._body))
        self._body = bytearray()


def _answers(wire: bytes) -> list[bytes]:
    answers = _Answers()
    httptools.HttpResponseParser(answers).feed_data(wire)
    return answers.bodies


def _request(index: int, body: bytes, chunked: bool) -> bytes:
    head = f"POST /r{index} HTTP/1.1\r\nHost: x\r\n".encode()
    if chunked:
        framed = b"".join(b"%x\r\n%s\r\n" % (1, bytes([b])) for b in body) + b"0\r\n\r\n"
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + framed
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


@settings(max_examples=60, deadline=None)
@given(
    bodies=st.lists(st.tuples(st.binary(max_size=40), st.booleans()), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=10),
)
def test_pipelined_requests_split_anywhere_are_answered_in_order(
    bodies: list[tuple[bytes, bool]], cuts: list[int]
) -> None:
    wire = b"".join(_request(i, body, chunked) for i, (body, chunked) in enumerate(bodies))

    async def scenario() -> bytes:
        conn, transport = _connection()
        start = 0
        for cut in [*sorted({min(c, len(wire)) for c in cuts}), len(wire)]:
            conn.data_received(wire[start:cut])
            start = cut
            await _settle()
        await _settle()
        assert not transport.ended
        return bytes(transport.written)

    answers = _answers(asyncio.run(scenario()))
    assert answers == [b"POST " + body for body, _chunked in bodies]


@settings(max_examples=80, deadline=None)
@given(noise=st.binary(min_size=1, max_size=300))
def test_arbitrary_bytes_get_at_most_json_refusals_and_never_an_exception(noise: bytes) -> None:
    async def scenario() -> tuple[bytes, bool]:
        conn, transport = _connection()
        conn.data_received(noise)
        await _settle()
        return bytes(transport.written), transport.closed

    written, _closed = asyncio.run(scenario())
    if written:
        assert written.startswith(b"HTTP/1.1 ")
        for status_line in written.split(b"\r\n\r\n")[0:1]:
            status = int(status_line.split(b" ")[1])
            assert status in (200, 400, 405, 413, 431), written


def test_a_pipelined_head_pauses_reading_until_the_answer_before_it_is_out() -> None:
    release = asyncio.Event()

    async def slow(exchange: Exchange) -> None:
        if exchange.target == "/first":
            await release.wait()
        await exchange.respond(200, [], exchange.target.encode())

    async def scenario() -> None:
        conn, transport = _connection(slow)
        conn.data_received(b"GET /first HTTP/1.1\r\n\r\nGET /second HTTP/1.1\r\n\r\n")
        await _settle()
        assert not transport.reading
        assert transport.written == b""
        release.set()
        await _settle()
        assert transport.reading
        assert _answers(bytes(transport.written)) == [b"/first", b"/second"]

    asyncio.run(scenario())


def test_a_body_the_handler_does_not_read_yet_pauses_reading_past_the_high_water() -> None:
    go = asyncio.Event()

    async def lagging(exchange: Exchange) -> None:
        await go.wait()
        await echo(exchange)

    async def scenario() -> None:
        conn, transport = _connection(lagging)
        size = 200 * 1024
        conn.data_received(b"POST /big HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 8192):
            conn.data_received(b"x" * 8192)
        assert not transport.reading  # the handler lags: the socket is left to fill
        go.set()
        await _settle()
        assert transport.reading
        assert _answers(bytes(transport.written)) == [b"POST " + b"x" * size]

    asyncio.run(scenario())


def test_a_paused_transport_holds_writes_until_it_resumes() -> None:
    wrote = []

    async def streaming(exchange: Exchange) -> None:
        await exchange.start(200, [("Content-Type", "text/event-stream")])
        for index in range(3):
            await exchange.write(b"data: %d\n\n" % index)
            wrote.append(index)
        await exchange.finish()

    async def scenario() -> None:
        conn, transport = _connection(streaming)
        conn.pause_writing()
        conn.data_received(b"GET /s HTTP/1.1\r\n\r\n")
        await _settle()
        assert wrote == []  # the first write waits for the client's socket
        conn.resume_writing()
        await _settle()
        assert wrote == [0, 1, 2]
        assert conn.write_paused is False
        assert _answers(bytes(transport.written)) == [b"data: 0\n\ndata: 1\n\ndata: 2\n\n"]
        assert b"Transfer-Encoding: chunked" in transport.written

    asyncio.run(scenario())


def test_a_refusal_behind_a_pipelined_request_is_answered_in_turn_then_it_closes() -> None:
    async def scenario() -> None:
        conn, transport = _connection()
        conn.data_received(b"GET /ok HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\nBad Header: 1\r\n\r\n")
        await _settle()
        answers = _Answers()
        parser = httptools.HttpResponseParser(answers)
        parser.feed_data(bytes(transport.written))
        assert answers.bodies[0] == b"GET "
        assert b'"code":"bad_http_request"' in answers.bodies[1].replace(b" ", b"")
        assert transport.ended
        assert conn.phase is Phase.CLOSING

    asyncio.run(scenario())


def test_a_client_that_leaves_mid_body_cancels_the_handler_and_fails_later_reads() -> None:
    outcome: list[str] = []
    exchanges: list[Exchange] = []

    async def reader(exchange: Exchange) -> None:
        exchanges.append(exchange)
        try:
            await exchange.read_chunk()
            await exchange.read_chunk()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    async def scenario() -> None:
        conn, transport = _connection(reader)
        conn.data_received(b"POST /b HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        await _settle()
        conn.connection_lost(ConnectionResetError())
        await _settle()
        assert outcome == ["cancelled"]
        with pytest.raises(ConnectionResetError):
            await exchanges[0].read_chunk()
        assert transport.written == b""

    asyncio.run(scenario())


def test_an_upgrade_is_not_made_the_request_is_answered_and_the_connection_closes() -> None:
    async def scenario() -> None:
        conn, transport = _connection()
        conn.data_received(b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                           b"\r\nnot http at all")
        await _settle()
        assert _answers(bytes(transport.written)) == [b"GET "]
        assert b"Connection: close" in transport.written
        assert transport.ended

    asyncio.run(scenario())


def test_versions_other_than_1_0_and_1_1_are_refused_as_a_bad_request_line() -> None:
    async def scenario() -> None:
        conn, transport = _connection()
        conn.data_received(b"GET /x HTTP/2.0\r\nHost: x\r\n\r\n")
        await _settle()
        assert transport.written.startswith(b"HTTP/1.1 400 ")
        assert b"HTTP version is invalid" in transport.written
        assert transport.ended

    asyncio.run(scenario())


@pytest.mark.parametrize("earlier", [0, 2])
def test_a_client_gone_before_its_handler_ran_leaves_nothing_in_flight(earlier: int) -> None:
    # The request is handed over and the client leaves in the same turn of the loop,
    # before the connection's task runs it: on a fresh connection (the task never took
    # a step) and on one that served ``earlier`` requests (its task waits for the next).
    async def scenario() -> None:
        conn, transport = _connection()
        for _ in range(earlier):
            conn.data_received(b"GET /a HTTP/1.1\r\n\r\n")
            await _settle()
        assert transport.written.count(b"HTTP/1.1 200 ") == earlier
        conn.data_received(b"GET /b HTTP/1.1\r\n\r\n")
        conn.connection_lost(None)
        await _settle()
        server = conn.server
        assert isinstance(server, H1Server)
        started = time.monotonic()
        await asyncio.wait_for(server.shutdown(5.0), 10.0)
        assert time.monotonic() - started < 2.0  # nothing in flight to wait for
        assert b"/b" not in transport.written

    asyncio.run(scenario())


def test_a_later_heads_deadline_counts_from_its_own_first_byte() -> None:
    # The connection's one timer is kept from the first head's deadline (it is not
    # recreated per request): coming due early, it must wait on for the second head's.
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        conn, transport = _connection(head_timeout_s=0.2)
        conn.data_received(b"GET /a HTTP/1.1\r\n\r\n")
        await _settle()
        assert transport.written.startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(0.1)  # the first head's deadline is due halfway through the next
        begun = loop.time()
        conn.data_received(b"GET /b HT")
        while not transport.ended:
            assert loop.time() - begun < 2.0, "the head deadline never ran"
            await asyncio.sleep(0.01)
        assert loop.time() - begun >= 0.2 * 0.9
        assert b"request_head_timeout" in transport.written

    asyncio.run(scenario())


def test_a_head_begun_in_the_read_that_ended_the_last_body_runs_the_head_deadline() -> None:
    async def scenario() -> None:
        conn, transport = _connection(head_timeout_s=0.05)
        conn.data_received(b"GET /a HTTP/1.1\r\n\r\nGET /b HT")
        await _settle()
        assert conn.phase is Phase.HEAD
        for _ in range(100):
            if transport.ended:
                break
            await asyncio.sleep(0.01)
        assert b"request_head_timeout" in transport.written

    asyncio.run(scenario())
