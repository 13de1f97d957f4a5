"""The upstream client's streamed request bodies, HEAD and interim answers, on the wire.

Raw loopback backends (tests/fixtures/raw_backend.py) read exactly what the client
wrote; a streamed body is an async generator that records how far it was read, so
"never buffered whole" is checked against what the backend had taken at that moment.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.core.errors import BadRequest, PayloadTooLarge
from tests.fixtures.raw_backend import (
    MakePool,
    Peer,
    StartBackend,
    fetch,
    keep_alive,
    read_all,
    response,
    until,
)

pytestmark = pytest.mark.timeout(30)

PIECES = [b"first,", b"", b"second,", b"x" * 70_000, b"end"]


async def pieces(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


# --- streamed bodies --------------------------------------------------------------------------


async def test_a_streamed_body_with_a_declared_length_goes_out_raw_under_that_length(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    backend = await start_backend(keep_alive)
    pool, target = make_pool(), backend.target()
    whole = b"".join(PIECES)
    resp, data = await fetch(pool, target, "POST", headers={"Content-Length": str(len(whole))},
                             body=pieces(PIECES))
    assert (resp.status, data) == (200, b"ok")
    sent = backend.requests[0]
    assert sent.header("Content-Length") == str(len(whole)).encode()
    assert sent.header("Transfer-Encoding") is None
    assert sent.body == whole
    await fetch(pool, target)  # the whole exchange was clean: the connection is kept
    assert backend.accepted == 1


async def test_a_streamed_body_without_a_length_goes_out_chunked_piece_by_piece(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    backend = await start_backend(keep_alive)
    pool, target = make_pool(), backend.target()
    resp, data = await fetch(pool, target, "POST", body=pieces(PIECES))
    assert (resp.status, data) == (200, b"ok")
    sent = backend.requests[0]
    assert sent.header("Transfer-Encoding") == b"chunked"
    assert sent.header("Content-Length") is None
    assert sent.body == b"".join(PIECES)
    assert sent.chunks == [len(p) for p in PIECES if p]  # an empty piece never ends it
    await fetch(pool, target)
    assert backend.accepted == 1


async def test_a_large_streamed_body_is_written_only_as_fast_as_the_backend_reads(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    total, piece = 64 * 1024 * 1024, b"z" * 65536
    produced = received = lead = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced, lead
        while produced < total:
            lead = max(lead, produced - received)
            produced += len(piece)
            yield piece

    async def reader(peer: Peer) -> None:
        nonlocal received
        await peer.reader.readuntil(b"\r\n\r\n")
        while received < total:
            received += len(await peer.reader.read(65536))
        peer.send(response())
        await peer.wait_eof()

    backend = await start_backend(reader)
    resp, data = await fetch(make_pool(), backend.target(), "POST",
                             headers={"Content-Length": str(total)}, body=body())
    assert (resp.status, data, received) == (200, b"ok", total)
    # Without write flow control the client's stream is drained at once (nothing in the
    # writer waits), the backend having read nothing. With it, the lead stays within
    # the socket buffers (a few MiB on loopback).
    assert lead < 16 * 1024 * 1024, f"{lead} bytes read from the client ahead of the backend"


async def test_a_client_stream_failing_before_the_head_raises_its_own_error_and_closes(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    backend = await start_backend(keep_alive)
    pool, target = make_pool(), backend.target()
    refused = PayloadTooLarge("the body is too large", code="request_body_too_large")

    async def failing() -> AsyncIterator[bytes]:
        yield b"partial"
        raise refused

    with pytest.raises(BadRequest) as caught:
        await pool.request(target, "POST", "/", {"Content-Length": "100"}, failing())
    assert caught.value is refused
    await until(lambda: backend.eofs == 1)  # the half-written request's connection is closed
    await fetch(pool, target)
    assert backend.accepted == 2


async def test_a_streamed_body_shorter_than_its_declared_length_is_refused_and_closed(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    backend = await start_backend(keep_alive)
    pool, target = make_pool(), backend.target()
    with pytest.raises(BadRequest) as caught:
        await pool.request(target, "POST", "/", {"Content-Length": "10"}, pieces([b"12345"]))
    assert caught.value.code == "bad_http_request"
    await until(lambda: backend.eofs == 1)
    await fetch(pool, target)
    assert backend.accepted == 2


async def test_an_answer_before_the_body_is_all_written_is_relayed_and_never_reused(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    more = asyncio.Event()

    async def answers_early(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        peer.send(response(b"too large", status="413 Payload Too Large"))
        await peer.wait_eof()

    async def body() -> AsyncIterator[bytes]:
        yield b"part"
        await more.wait()  # the rest never comes while the answer is read
        yield b"rest"

    backend = await start_backend(answers_early)
    pool = make_pool()
    resp = await pool.request(backend.target(), "POST", "/", {}, body())
    assert (resp.status, await read_all(resp)) == (413, b"too large")
    resp.release()  # its request was never finished: the connection cannot carry another
    await until(lambda: backend.eofs == 1)
    more.set()


async def test_interim_answers_while_a_body_streams_are_skipped(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def continues(peer: Peer) -> None:
        head = await peer.reader.readuntil(b"\r\n\r\n")
        assert b"Expect: 100-continue" in head
        peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        size = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        peer.send(response(await peer.reader.readexactly(size)))
        await peer.wait_eof()

    backend = await start_backend(continues)
    resp, data = await fetch(make_pool(), backend.target(), "PUT",
                             headers={"Expect": "100-continue", "Content-Length": "9"},
                             body=pieces([b"streamed", b"!"]))
    assert (resp.status, data) == (200, b"streamed!")


# --- HEAD -------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["Content-Length: 1234", "Transfer-Encoding: chunked", None])
async def test_an_answer_to_head_has_no_body_and_keeps_the_connection(
    framing: str | None, start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def heads(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            if request.line.startswith(b"HEAD "):
                lines = ["HTTP/1.1 200 OK", "X-Kind: head", *([framing] if framing else [])]
                peer.send(("\r\n".join(lines) + "\r\n\r\n").encode())
            else:
                peer.send(response(b"after"))

    backend = await start_backend(heads)
    pool, target = make_pool(), backend.target()
    resp = await pool.request(target, "HEAD", "/", {}, b"")
    assert resp.status == 200
    assert resp.whole_body() is None  # relayed with its own framing headers, not recomputed
    assert await resp.read_chunk() == b""
    if framing is not None:
        name, value = framing.split(": ")
        assert resp.headers[name] == value
    resp.release()
    _, data = await fetch(pool, target)
    assert data == b"after"
    assert backend.accepted == 1
    assert backend.requests[0].header("Content-Length") is None  # no body, no length sent


async def test_a_body_sent_after_an_answer_to_head_closes_the_connection(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def head_with_body(peer: Peer) -> None:
        while await peer.request() is not None:
            peer.send(response(b"stray"))  # Content-Length 5, then 5 bytes nobody asked for

    backend = await start_backend(head_with_body)
    pool, target = make_pool(), backend.target()
    resp = await pool.request(target, "HEAD", "/", {}, b"")
    assert resp.status == 200
    assert await resp.read_chunk() == b""
    await until(lambda: backend.eofs == 1)  # the stray body closed it: never reused
    resp.release()
    await fetch(pool, target, "HEAD")
    assert backend.accepted == 2


async def test_interim_answers_before_an_answer_to_head_are_skipped(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def early_hints(peer: Peer) -> None:
        while await peer.request() is not None:
            peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                      b"HTTP/1.1 204 No Content\r\nX-Final: yes\r\n\r\n")

    backend = await start_backend(early_hints)
    pool, target = make_pool(), backend.target()
    resp, _ = await fetch(pool, target, "HEAD")
    assert (resp.status, resp.headers.get("X-Final")) == (204, "yes")
    assert "Link" not in resp.headers  # the interim head's headers are not the answer's
    await fetch(pool, target, "HEAD")
    assert backend.accepted == 1
