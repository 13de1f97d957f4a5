"""The relay's streaming loop (proxy/dataplane/relay.py ``_stream``) between the real
upstream client and the real data-port server: a client that stops reading must stop
the backend's bytes at the backend (flow control through the proxy), and lose none."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.relay import _stream
from tests.fixtures.raw_backend import IDLE_S, MakePool, Peer, StartBackend
from tests.integration.dataplane.test_h1_server import Serve, serve

__all__ = ["serve"]  # the fixture, shared with the server's own tests

pytestmark = pytest.mark.timeout(30)

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_a_client_that_stops_reading_pauses_the_backend_and_loses_nothing(
    serve: Serve, start_backend: StartBackend, make_pool: MakePool
) -> None:
    piece = b"data: " + b"x" * 16 * 1024 + b"\n\n"
    count = 2000  # ~32 MB: over twice what the socket buffers on the way can hold
    sent = 0

    async def script(peer: Peer) -> None:
        nonlocal sent
        await peer.request()
        # A small send buffer, so what the backend wrote is close to what left it.
        peer.writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        peer.send(HEAD)
        framed = b"%x\r\n%s\r\n" % (len(piece), piece)
        for _ in range(count):
            peer.send(framed)
            await peer.writer.drain()
            sent += len(piece)
        peer.send(b"0\r\n\r\n")
        await peer.writer.drain()
        await peer.wait_eof()

    backend = await start_backend(script)
    # The idle timeout is shorter than the stall: a client not reading is no silence.
    pool = make_pool(idle_timeout_s=IDLE_S)

    async def handler(exchange: Exchange) -> None:
        resp = await pool.request(backend.target(), "GET", "/", {}, b"")
        await exchange.start(200, [("Content-Type", "text/event-stream")])
        await _stream(exchange, resp, None)
        await exchange.finish()
        resp.release()

    _server, port = await serve(handler)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=client, limit=2**20)
    try:
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        # Not reading: the proxy's write to the client pauses, the relay stops taking,
        # the upstream read pauses, and the backend's own writes stall.
        stalled, still_since = -1, time.monotonic()
        while time.monotonic() - still_since < 2 * IDLE_S:  # until stuck a while
            if sent != stalled:
                stalled, still_since = sent, time.monotonic()
            await asyncio.sleep(0.02)
        total = len(piece) * count
        assert stalled < total // 2, f"the proxy kept reading: the backend sent {stalled} B"
        received = 0
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
            received += size
        assert received == total
    finally:
        writer.close()
