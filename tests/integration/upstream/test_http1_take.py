"""The relay's way of reading a body (proxy/upstream/http1.py ``take_chunk`` and
``arrival``): all that is buffered at once, a bare future per wait, errors and the end
told the same way ``read_chunk`` tells them."""

from __future__ import annotations

import asyncio

import pytest

from proxy.core.errors import UpstreamBodyError
from tests.fixtures.raw_backend import MakePool, Peer, Script, StartBackend

pytestmark = pytest.mark.timeout(15)

CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _three_events_then_end(go: asyncio.Event) -> Script:
    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(CHUNKED)
        await peer.writer.drain()
        await go.wait()
        peer.send(b"".join(_chunk(b"data: %d\n\n" % i) for i in (1, 2, 3)) + b"0\r\n\r\n")
        await peer.writer.drain()
        await peer.wait_eof()

    return script


async def test_everything_buffered_is_taken_in_one_piece_then_the_end(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    go = asyncio.Event()
    # Three events and the end in one segment: llhttp hands over three bodies.
    backend = await start_backend(_three_events_then_end(go))
    resp = await make_pool().request(backend.target(), "GET", "/", {}, b"")
    assert resp.take_chunk() is None  # nothing of the body yet: wait for it
    arrived = resp.arrival()
    go.set()
    await arrived
    assert resp.take_chunk() == b"data: 1\n\ndata: 2\n\ndata: 3\n\n"
    assert resp.take_chunk() == b""  # the end came in the same read
    resp.release()


async def test_a_body_cut_short_wakes_the_waiter_and_take_raises(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    go = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(CHUNKED + _chunk(b"data: 1\n\n"))
        await peer.writer.drain()
        await go.wait()  # then the connection closes mid-body

    backend = await start_backend(script)
    resp = await make_pool().request(backend.target(), "GET", "/", {}, b"")
    while (first := resp.take_chunk()) is None:
        await resp.arrival()
    assert first == b"data: 1\n\n"
    arrived = resp.arrival()
    go.set()
    await asyncio.wait_for(arrived, 5)
    with pytest.raises(UpstreamBodyError):
        resp.take_chunk()
    resp.close()


async def test_a_silent_backend_mid_body_fails_the_arrival_wait_by_the_idle_timeout(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(CHUNKED + _chunk(b"data: 1\n\n"))
        await peer.writer.drain()
        await peer.wait_eof()  # and never another byte

    backend = await start_backend(script)
    resp = await make_pool(idle_timeout_s=0.2).request(backend.target(), "GET", "/", {}, b"")
    while (first := resp.take_chunk()) is None:
        await resp.arrival()
    assert first == b"data: 1\n\n"
    await asyncio.wait_for(resp.arrival(), 5)  # woken by the idle timer, not by bytes
    with pytest.raises(UpstreamBodyError, match="silent"):
        resp.take_chunk()
    resp.close()


async def test_a_sink_gets_each_piece_unbuffered_until_it_says_stop(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    go = asyncio.Event()
    backend = await start_backend(_three_events_then_end(go))
    resp = await make_pool().request(backend.target(), "GET", "/", {}, b"")
    got: list[bytes] = []

    def sink(piece: bytes) -> bool:
        got.append(piece)
        return len(got) < 2  # the client's socket is full after the second

    assert resp.take_chunk() is None
    resp.stream_to(sink)
    arrived = resp.arrival()
    go.set()
    await arrived  # woken by the stop, not once per piece
    resp.stream_to(None)
    assert got == [b"data: 1\n\n", b"data: 2\n\n"]
    assert resp.take_chunk() == b"data: 3\n\n"  # buffered after the stop, in order
    assert resp.take_chunk() == b""
    resp.release()


async def test_a_sink_that_raises_wakes_the_waiter_and_take_raises_it(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    go = asyncio.Event()
    backend = await start_backend(_three_events_then_end(go))
    resp = await make_pool().request(backend.target(), "GET", "/", {}, b"")

    def sink(piece: bytes) -> bool:
        raise ConnectionResetError("the client went away")

    resp.stream_to(sink)
    arrived = resp.arrival()
    go.set()
    await asyncio.wait_for(arrived, 5)
    resp.stream_to(None)
    with pytest.raises(ConnectionResetError):
        resp.take_chunk()
    resp.close()
