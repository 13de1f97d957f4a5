"""The upstream client (proxy/upstream/http1.py, pool.py) against raw backends on loopback
sockets (tests/fixtures/raw_backend.py): held bodies, keep-alive, replays, framing,
timeouts and the pool's limits. Streamed bodies and HEAD: test_http1_streamed.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time

import pytest

from proxy.config.settings import UpstreamConfig
from proxy.core.errors import (
    UpstreamBodyError,
    UpstreamConnectError,
    UpstreamDropped,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.upstream.framing import Target
from tests.fixtures.raw_backend import (
    IDLE_S,
    QUIET_S,
    SLOW_S,
    MakePool,
    Peer,
    StartBackend,
    fetch,
    keep_alive,
    read_all,
    response,
    until,
)

# A broken promise must fail the test, not hang it.
pytestmark = pytest.mark.timeout(15)

# --- what goes out, what comes back -------------------------------------------------------


async def test_request_reaches_the_backend_with_prefix_host_headers_and_body(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    backend = await start_backend(keep_alive)
    raw = b"caf\xe9 \xff"  # not UTF-8: held as str through surrogateescape
    headers = {"X-Raw": raw.decode("utf-8", "surrogateescape"), "Content-Type": "text/plain"}
    resp, body = await fetch(
        make_pool(), backend.target("/base/"), "POST", "/v1/x?q=a%20b", headers, b"hello"
    )
    assert (resp.status, body) == (200, b"ok")
    [seen] = backend.requests
    assert seen.line == b"POST /base/v1/x?q=a%20b HTTP/1.1"
    assert seen.header("Host") == f"127.0.0.1:{backend.port}".encode()
    assert seen.header("X-Raw") == raw
    assert seen.header("Content-Length") == b"5"
    assert seen.body == b"hello"


async def test_ipv6_literal_backend_is_reached_with_a_bracketed_host(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    backend = await start_backend(keep_alive, host="::1")
    _, body = await fetch(make_pool(), backend.target("/v6"), path="/x")
    assert body == b"ok"
    [seen] = backend.requests
    assert seen.line == b"GET /v6/x HTTP/1.1"
    assert seen.header("Host") == f"[::1]:{backend.port}".encode()


async def test_response_head_is_parsed_and_non_utf8_values_round_trip(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(
            b"HTTP/1.1 201 Made Up Reason\r\nContent-Type: Text/Event-Stream; charset=utf-8\r\n"
            b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Raw: caf\xe9\r\nContent-Length: 4\r\n\r\n"
            b"data"
        )
        await peer.wait_eof()

    backend = await start_backend(script)
    resp, body = await fetch(make_pool(), backend.target())
    assert (resp.status, resp.reason, body) == (201, "Made Up Reason", b"data")
    assert resp.content_type == "text/event-stream"
    assert resp.headers.getall("set-cookie") == ["a=1", "b=2"]
    assert resp.headers["X-Raw"].encode("utf-8", "surrogateescape") == b"caf\xe9"


# --- keep-alive ---------------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    backend = await start_backend(keep_alive)
    pool, target = make_pool(), backend.target()
    for _ in range(5):
        assert (await fetch(pool, target))[1] == b"ok"
    assert (backend.accepted, len(backend.requests)) == (1, 5)


@pytest.mark.parametrize(
    "answer",
    [
        response(b"ok", "Connection: close"),
        response(b"ok", version="HTTP/1.0"),
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_response_that_refuses_keep_alive_is_not_reused(
    answer: bytes, start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(answer)
        await peer.wait_eof()  # the backend leaves it open: the client must close it

    backend = await start_backend(script)
    pool, target = make_pool(), backend.target()
    for _ in range(2):
        assert (await fetch(pool, target))[1] == b"ok"
    assert backend.accepted == 2
    await until(lambda: backend.eofs == 2)


@pytest.mark.parametrize("finish", ["close", "release"])
async def test_response_not_read_to_its_end_is_not_reused(
    finish: str, start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        if peer.index == 1:
            await peer.request()
            peer.send(response(b"0123456789"))
            await peer.wait_eof()
        else:
            await keep_alive(peer)

    backend = await start_backend(script)
    pool, target = make_pool(), backend.target()
    resp = await pool.request(target, "GET", "/", {}, b"")
    assert resp.status == 200
    getattr(resp, finish)()  # the body was never read
    await until(lambda: backend.eofs == 1)
    assert (await fetch(pool, target))[1] == b"ok"
    assert backend.accepted == 2


async def test_idle_connection_past_keepalive_is_not_reused(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    backend = await start_backend(keep_alive)
    pool, target = make_pool(keepalive_s=0.2), backend.target()
    await fetch(pool, target)
    await asyncio.sleep(0.3)
    await fetch(pool, target)
    assert backend.accepted == 2
    await until(lambda: backend.eofs == 1)


async def test_unsolicited_bytes_on_an_idle_connection_drop_it(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        if peer.index == 1:
            await peer.request()
            peer.send(response())
            await asyncio.sleep(0.05)
            peer.send(b"HTTP/1.1 200 OK\r\n")  # nobody asked
            await peer.wait_eof()
        else:
            await keep_alive(peer)

    backend = await start_backend(script)
    pool, target = make_pool(), backend.target()
    await fetch(pool, target)
    await until(lambda: backend.eofs == 1)
    assert (await fetch(pool, target))[1] == b"ok"
    assert backend.accepted == 2


# --- a stale idle connection --------------------------------------------------------------


@pytest.mark.parametrize("when", ["after-answering", "on-the-next-request"])
async def test_stale_idle_connection_is_retried_on_a_fresh_one(
    when: str, start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        if peer.index == 1:
            await peer.request()
            peer.send(response(b"first"))  # keep-alive, yet the backend closes after it
            if when == "on-the-next-request":
                # The close races the client's next request: it is read, never answered.
                await peer.request()
        else:
            await keep_alive(peer)

    backend = await start_backend(script)
    pool, target = make_pool(), backend.target()
    assert (await fetch(pool, target))[1] == b"first"
    await asyncio.sleep(0.05)
    assert (await fetch(pool, target, replayable=True))[1] == b"ok"
    assert backend.accepted == 2
    if when == "on-the-next-request":
        # The second request went out twice: on the stale connection, then on a fresh one.
        assert len(backend.requests) == 3


async def test_a_post_read_on_a_stale_connection_is_never_written_twice(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        if peer.index == 1:
            peer.send(response(b"first"))
            await peer.request()  # read, never answered: closed as the backend shuts it
        else:
            await keep_alive(peer)

    backend = await start_backend(script)
    pool, target = make_pool(), backend.target()
    await fetch(pool, target, "POST", body=b"{}")
    with pytest.raises(UpstreamDropped) as caught:
        await pool.request(target, "POST", "/", {}, b"{}")  # not replayable
    assert caught.value.reused
    assert len(backend.requests) == 2  # the backend saw it once, and it was not resent
    assert backend.accepted == 1


async def test_fresh_connection_closed_unanswered_is_dropped_not_a_connect_error(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()  # read, then closed without a word

    backend = await start_backend(script)
    with pytest.raises(UpstreamDropped) as caught:
        await make_pool().request(backend.target(), "GET", "/", {}, b"", replayable=True)
    assert not caught.value.reused
    assert backend.accepted == 1  # not retried: the backend read it


async def test_stale_connection_is_retried_only_once(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        if peer.index == 1:
            peer.send(response())
            await peer.request()  # every later request is read and left unanswered

    backend = await start_backend(script)
    pool, target = make_pool(), backend.target()
    await fetch(pool, target)
    with pytest.raises(UpstreamDropped):
        await pool.request(target, "GET", "/", {}, b"", replayable=True)
    assert backend.accepted == 2


# --- framing ------------------------------------------------------------------------------


async def test_chunked_response_is_decoded_and_keeps_the_connection(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await peer.writer.drain()
            await asyncio.sleep(0.02)
            peer.send(b"1;ext=1\r\n,\r\n6\r\n world\r\n")
            await asyncio.sleep(0.02)
            peer.send(b"0\r\nX-Trailer: t\r\n\r\n")

    backend = await start_backend(script)
    pool, target = make_pool(), backend.target()
    for _ in range(2):
        assert (await fetch(pool, target))[1] == b"hello, world"
    assert backend.accepted == 1


async def test_body_delimited_by_connection_close_is_read_whole(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await peer.writer.drain()
        await asyncio.sleep(0.02)
        peer.send(b"the end")  # then the script returns: the connection closes

    backend = await start_backend(script)
    pool, target = make_pool(), backend.target()
    for _ in range(2):
        assert (await fetch(pool, target))[1] == b"until the end"
    assert backend.accepted == 2


async def test_no_body_statuses_keep_the_connection(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    answers = [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        # A 304 may carry the length of the representation it stands for: still no body.
        b"HTTP/1.1 304 Not Modified\r\nETag: \"e1\"\r\nContent-Length: 5\r\n\r\n",
        response(b"after"),
    ]

    async def script(peer: Peer) -> None:
        for answer in answers:
            await peer.request()
            peer.send(answer)
        await peer.wait_eof()

    backend = await start_backend(script)
    pool, target = make_pool(), backend.target()
    got = [await fetch(pool, target) for _ in answers]
    assert [(resp.status, body) for resp, body in got] == [(204, b""), (304, b""), (200, b"after")]
    assert backend.accepted == 1


async def test_interim_responses_before_the_real_one_are_skipped(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await peer.writer.drain()
            await asyncio.sleep(0.02)
            peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n" + response())

    backend = await start_backend(script)
    pool, target = make_pool(), backend.target()
    for _ in range(2):
        resp, body = await fetch(pool, target, "POST", body=b"{}")
        assert (resp.status, resp.reason, body) == (200, "OK", b"ok")
        assert "Link" not in resp.headers
    assert backend.accepted == 1


# --- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "part"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"0123456789"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"a\r\n0123456789\r\n"),
    ],
    ids=["content-length", "chunked"],
)
async def test_backend_closing_mid_body_is_a_body_error(
    head: bytes, part: bytes, start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(head + part)
        await peer.writer.drain()
        await asyncio.sleep(0.05)  # then the connection closes, the body unfinished

    backend = await start_backend(script)
    resp = await make_pool().request(backend.target(), "GET", "/", {}, b"")
    assert resp.status == 200
    assert await resp.read_chunk() == b"0123456789"
    with pytest.raises(UpstreamBodyError):
        await resp.read_chunk()
    resp.close()


async def test_garbage_instead_of_a_response_is_an_upstream_error(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await peer.wait_eof()

    backend = await start_backend(script)
    with pytest.raises(UpstreamError) as caught:
        await make_pool().request(backend.target(), "GET", "/", {}, b"")
    # The backend answered (badly): not a connect failure, so not retried elsewhere.
    assert not isinstance(caught.value, UpstreamConnectError)
    await until(lambda: backend.eofs == 1)  # and the connection is dropped


async def test_refused_connection_is_a_connect_error(make_pool: MakePool) -> None:
    with socket.socket() as bound:  # bound, not listening: connecting is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with pytest.raises(UpstreamConnectError):
            await make_pool().request(Target(f"http://127.0.0.1:{port}"), "GET", "/", {}, b"")


async def test_silent_backend_times_out_before_the_head(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.wait_eof()  # never answers

    backend = await start_backend(script)
    started = time.monotonic()
    pool = make_pool(idle_timeout_s=IDLE_S)
    with pytest.raises(UpstreamTimeout):
        await asyncio.wait_for(pool.request(backend.target(), "GET", "/", {}, b""), SLOW_S)
    assert IDLE_S * 0.9 <= time.monotonic() - started < SLOW_S
    await until(lambda: backend.eofs == 1)


async def test_a_silent_backend_on_a_reused_connection_times_out_from_its_own_request(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    # The connection's idle timer outlives the first response (it is not recreated per
    # request): it must still time the second request from that request's own send.
    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(response(b"first"))
        await peer.request()
        await peer.wait_eof()  # the second is never answered

    backend = await start_backend(script)
    pool, target = make_pool(idle_timeout_s=IDLE_S), backend.target()
    assert (await fetch(pool, target))[1] == b"first"
    # Past half the first request's timer: it comes due while the second one waits.
    await asyncio.sleep(IDLE_S / 2)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await asyncio.wait_for(pool.request(target, "GET", "/", {}, b""), SLOW_S)
    assert IDLE_S * 0.9 <= time.monotonic() - started < SLOW_S
    assert backend.accepted == 1  # the same connection, reused
    await until(lambda: backend.eofs == 1)


async def silent_mid_body(peer: Peer) -> None:
    await peer.request()
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
    await peer.wait_eof()  # the rest never comes


async def test_silent_backend_times_out_mid_body(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    backend = await start_backend(silent_mid_body)
    resp = await make_pool(idle_timeout_s=IDLE_S).request(backend.target(), "GET", "/", {}, b"")
    assert await resp.read_chunk() == b"0123456789"
    started = time.monotonic()
    with pytest.raises(UpstreamError):  # which one: see the next test
        await asyncio.wait_for(resp.read_chunk(), SLOW_S)
    assert IDLE_S * 0.9 <= time.monotonic() - started < SLOW_S
    resp.close()
    await until(lambda: backend.eofs == 1)


async def test_silent_backend_mid_body_is_a_body_error(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    backend = await start_backend(silent_mid_body)
    resp = await make_pool(idle_timeout_s=IDLE_S).request(backend.target(), "GET", "/", {}, b"")
    assert await resp.read_chunk() == b"0123456789"
    try:
        with pytest.raises(UpstreamBodyError):
            await asyncio.wait_for(resp.read_chunk(), SLOW_S)
    finally:
        resp.close()


async def test_bytes_after_a_complete_response_are_not_part_of_its_body(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        if peer.index == 1:
            await peer.request()
            peer.send(response(b"hi") + response(b"smuggled"))
            await peer.wait_eof()
        else:
            await keep_alive(peer)

    backend = await start_backend(script)
    pool, target = make_pool(), backend.target()
    assert (await fetch(pool, target))[1] == b"hi"
    assert (await fetch(pool, target))[1] == b"ok"  # on a fresh connection
    assert backend.accepted == 2


# --- backpressure -------------------------------------------------------------------------


async def test_unread_body_stops_the_reading_and_then_arrives_intact(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    size, piece = 16 << 20, 64 << 10
    payload = os.urandom(size)
    sent = 0

    async def flood(peer: Peer) -> None:
        nonlocal sent
        await peer.request()
        # A small send buffer, so what the backend wrote is close to what left it.
        peer.writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, piece
        )
        peer.send(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        view = memoryview(payload)
        for offset in range(0, size, piece):
            peer.send(view[offset:offset + piece])
            await peer.writer.drain()
            sent = offset + piece
        await peer.wait_eof()

    backend = await start_backend(flood)
    # The idle timeout is shorter than the stall: a consumer not reading is no silence.
    resp = await make_pool(idle_timeout_s=IDLE_S).request(backend.target(), "GET", "/", {}, b"")
    stalled, still_since = -1, time.monotonic()
    while time.monotonic() - still_since < 2 * IDLE_S:  # until the backend is stuck a while
        if sent != stalled:
            stalled, still_since = sent, time.monotonic()
        await asyncio.sleep(0.02)
    assert stalled < size // 2, f"the client kept reading: the backend sent {stalled} bytes"
    body = await read_all(resp)
    assert len(body) == size
    assert hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()
    resp.release()


async def test_a_whole_body_taken_at_once_leaves_the_connection_reading(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    # Larger than the high-water mark and sent at once: the read that completes it also
    # pauses the socket, so taking it with whole_body() must resume reading, or the
    # next response on the reused connection would never be read.
    big = os.urandom(300_000)

    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(response(big))
        await keep_alive(peer)

    backend = await start_backend(script)
    pool, target = make_pool(idle_timeout_s=IDLE_S), backend.target()
    resp = await pool.request(target, "GET", "/", {}, b"")
    deadline = time.monotonic() + SLOW_S
    while (whole := resp.whole_body()) is None:
        assert time.monotonic() < deadline, "the whole body never arrived"
        await asyncio.sleep(0.01)
    assert whole == big
    assert await resp.read_chunk() == b""
    resp.release()
    assert (await fetch(pool, target))[1] == b"ok"
    assert backend.accepted == 1


async def test_whole_body_is_none_while_the_body_is_still_coming(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    release = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        await release.wait()
        peer.send(b"cd")
        await peer.wait_eof()

    backend = await start_backend(script)
    resp = await make_pool().request(backend.target(), "GET", "/", {}, b"")
    await asyncio.sleep(QUIET_S)
    assert resp.whole_body() is None
    release.set()
    assert await read_all(resp) == b"abcd"
    resp.release()


# --- pool limits, close, cancellation -----------------------------------------------------


async def test_pool_size_one_queues_a_second_request_for_the_same_connection(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    backend = await start_backend(keep_alive)
    pool, target = make_pool(pool_size=1), backend.target()
    first = await pool.request(target, "GET", "/", {}, b"")
    second = asyncio.create_task(fetch(pool, target))
    await asyncio.sleep(QUIET_S)
    assert not second.done()
    assert len(backend.requests) == 1
    assert await read_all(first) == b"ok"
    first.release()
    assert (await asyncio.wait_for(second, SLOW_S))[1] == b"ok"
    assert backend.accepted == 1


async def test_per_host_limit_leaves_other_origins_free(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    one, other = await start_backend(keep_alive), await start_backend(keep_alive)
    pool = make_pool(per_host=1)
    held = await pool.request(one.target(), "GET", "/", {}, b"")
    queued = asyncio.create_task(fetch(pool, one.target()))
    assert (await asyncio.wait_for(fetch(pool, other.target()), SLOW_S))[1] == b"ok"
    assert not queued.done()  # the limit holds for its own origin
    assert await read_all(held) == b"ok"
    held.release()
    assert (await asyncio.wait_for(queued, SLOW_S))[1] == b"ok"
    assert (one.accepted, other.accepted) == (1, 1)


async def test_idle_connection_elsewhere_is_evicted_at_the_total_limit(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    one, other = await start_backend(keep_alive), await start_backend(keep_alive)
    pool = make_pool(pool_size=1)
    await fetch(pool, one.target())  # now idle, holding the only slot
    assert (await asyncio.wait_for(fetch(pool, other.target()), SLOW_S))[1] == b"ok"
    await until(lambda: one.eofs == 1)


async def test_pool_close_closes_idle_connections_and_refuses_requests(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    backend = await start_backend(keep_alive)
    pool, target = make_pool(), backend.target()
    await fetch(pool, target)
    await pool.close()
    await until(lambda: backend.eofs == 1)
    with pytest.raises(UpstreamConnectError):
        await pool.request(target, "GET", "/", {}, b"")
    assert backend.accepted == 1


async def test_cancelled_request_closes_its_connection_and_frees_its_slot(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        if peer.index == 1:
            await peer.request()
            await peer.wait_eof()  # no answer: the client gives up first
        else:
            await keep_alive(peer)

    backend = await start_backend(script)
    pool, target = make_pool(pool_size=1), backend.target()
    waiting = asyncio.create_task(pool.request(target, "GET", "/", {}, b""))
    await until(lambda: len(backend.requests) == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await until(lambda: backend.eofs == 1)
    assert (await asyncio.wait_for(fetch(pool, target), SLOW_S))[1] == b"ok"
    assert backend.accepted == 2


async def test_cancelled_wait_for_a_slot_leaks_nothing(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    backend = await start_backend(keep_alive)
    pool, target = make_pool(pool_size=1), backend.target()
    held = await pool.request(target, "GET", "/", {}, b"")
    queued = asyncio.create_task(pool.request(target, "GET", "/", {}, b""))
    await asyncio.sleep(QUIET_S)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert await read_all(held) == b"ok"
    held.release()
    assert (await asyncio.wait_for(fetch(pool, target), SLOW_S))[1] == b"ok"
    assert (backend.accepted, len(backend.requests)) == (1, 2)


# --- stray responses and the quiet period ---------------------------------------------------


async def stray_after_each_answer(peer: Peer) -> None:
    """Answers each request after 100 ms (a generation), then 50 ms later an unsolicited
    second response: the bytes that once reached the next, unrelated request."""
    while await peer.request() is not None:
        await asyncio.sleep(0.1)
        peer.send(response(b"ok"))
        await asyncio.sleep(0.05)
        peer.send(response(b"stray"))


async def test_a_stray_response_after_a_complete_one_never_reaches_the_next_request(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    backend = await start_backend(stray_after_each_answer)
    pool, target = make_pool(quiet_ms=UpstreamConfig().reuse_quiet_ms), backend.target()
    bodies = [(await fetch(pool, target, "POST", body=b"{}"))[1] for _ in range(6)]
    assert bodies == [b"ok"] * 6
    # Each connection that received a stray while idle was closed, never lent again.
    await until(lambda: backend.eofs >= 5)


async def test_without_the_quiet_period_the_stray_would_be_read_as_the_next_answer(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    # The control for the test above: the same backend, connections lent at once.
    backend = await start_backend(stray_after_each_answer)
    pool, target = make_pool(quiet_ms=0), backend.target()
    bodies = [(await fetch(pool, target, "POST", body=b"{}"))[1] for _ in range(2)]
    assert bodies == [b"ok", b"stray"]


async def test_a_pool_at_its_limit_lends_a_young_idle_connection_rather_than_wait(
    start_backend: StartBackend, make_pool: MakePool
) -> None:
    backend = await start_backend(keep_alive)
    pool, target = make_pool(pool_size=1, quiet_ms=10_000), backend.target()
    await fetch(pool, target)
    assert (await asyncio.wait_for(fetch(pool, target), SLOW_S))[1] == b"ok"
    assert backend.accepted == 1
