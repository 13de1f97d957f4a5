"""Size limits at the edge, over real sockets: request heads (431), request bodies (413,
up front or mid-stream with the upstream request aborted) and response heads (502,
never relayed) for held and streamed request bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.raw_http import port_of
from tests.fixtures.sim import StartPop
from tests.integration.admin.sessions_helpers import wait_routable

KIB = 1024


async def _poll(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer: status, headers (lowercased names), body (by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _exchange(
    port: int, data: bytes, *, then: bytes = b"", answers: int = 1
) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``data`` (and ``then``) while reading ``answers`` answers, then expect the
    proxy to close. Writing may fail once the proxy has answered and closed: a client
    still sending a refused head or body is cut off, which is the point."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            for part in (data, then):
                if part:
                    writer.write(part)
                    await writer.drain()

    sending = asyncio.create_task(send())
    try:
        got = [await asyncio.wait_for(_read_answer(reader), 10) for _ in range(answers)]
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the proxy
        return got
    finally:
        sending.cancel()
        writer.close()


def _error(answer: tuple[int, dict[str, str], bytes], status: int, code: str) -> dict[str, Any]:
    got_status, headers, body = answer
    assert got_status == status, answer
    assert headers["content-type"] == "application/json"
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["code"] == code, error
    return error


def _big_head(path: str, headers: int, value_bytes: int) -> bytes:
    lines = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * value_bytes) for i in range(headers))
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n"


# --- request heads ---------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "value_bytes", "config"), [
    (120, 8000, {}),  # 961 KB: each line under aiohttp's 8190, the whole far over 64 KiB
    (3, 1000, {"max_request_head_bytes": 2048}),
])
async def test_a_request_head_over_the_cap_gets_431_before_anything_is_forwarded(
    headers: int, value_bytes: int, config: dict[str, Any],
    start_pop: StartPop, start_proxy: StartProxy,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], listen=config)
    [answer] = await _exchange(port_of(proxy.url), _big_head("/v1/x", headers, value_bytes))
    _error(answer, 431, "request_head_too_large")
    assert pop.requests == []
    assert pop.counters.requests == 0
    assert proxy.metric("pinproxy_bad_http_requests_total", listener="data",
                        reason="head_too_large") == 1


async def test_a_request_head_under_the_cap_is_served_and_one_over_it_refused_in_turn(
    start_pop: StartPop, start_proxy: StartProxy,
) -> None:
    """The cap counts the head exactly; a pipelined head over it is refused after the
    answer before it, and nothing of it is forwarded."""
    pop = await start_pop()
    proxy = await start_proxy([pop], listen={"max_request_head_bytes": 2048})
    under = _big_head("/v1/under", 1, 1900)
    assert len(under) <= 2048
    over = _big_head("/v1/over", 1, 2048)
    first, second = await _exchange(port_of(proxy.url), under + over, answers=2)
    assert first[0] == 200
    _error(second, 431, "request_head_too_large")
    assert [r.path for r in pop.requests] == ["/v1/under"]


async def test_a_head_sent_slowly_is_refused_once_it_passes_the_cap(
    start_pop: StartPop, start_proxy: StartProxy,
) -> None:
    """Refused as soon as the cap is passed without an end of head: the rest of a
    runaway head is never waited for (nor buffered)."""
    pop = await start_pop()
    proxy = await start_proxy([pop], listen={"max_request_head_bytes": 4096})
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))

    async def trickle() -> None:  # 1 KB lines, and never the end of the head
        with contextlib.suppress(ConnectionError):
            writer.write(b"GET /v1/x HTTP/1.1\r\nHost: x\r\n")
            for i in range(1000):
                writer.write(b"X-Slow-%d: %s\r\n" % (i, b"s" * 1000))
                await writer.drain()
                await asyncio.sleep(0.01)

    sending = asyncio.create_task(trickle())
    try:
        answer = await asyncio.wait_for(_read_answer(reader), 5)
        assert not sending.done()  # answered while the head was still coming
    finally:
        sending.cancel()
        writer.close()
    _error(answer, 431, "request_head_too_large")
    assert pop.counters.requests == 0


# --- request bodies --------------------------------------------------------------------


async def test_a_declared_body_over_the_cap_gets_413_up_front(
    start_pop: StartPop, start_proxy: StartProxy,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], listen={"max_request_body_bytes": 1000})
    port = port_of(proxy.url)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: 1001\r\n")
    # Only the head is sent: the answer must not wait for the body.
    [answer] = await _exchange(port, head + b"\r\n")
    _error(answer, 413, "request_body_too_large")
    # A client that asked first (Expect: 100-continue) is told no, never to go ahead.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"Expect: 100-continue\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    # (Answered like a parse error, before any request exists: as HTTP/1.0, then closed.)
    assert raw.split(b" ", 2)[1] == b"413"
    assert b"100 Continue" not in raw
    assert pop.counters.requests == 0
    assert proxy.metric("pinproxy_bad_http_requests_total", listener="data",
                        reason="body_too_large") == 2
    # At the cap exactly: served.
    body = b'{"x": "' + b"a" * 991 + b'"}'
    assert len(body) == 1000
    ok = head.replace(b"1001", b"1000") + b"Connection: close\r\n\r\n" + body
    [(status, _, _)] = await _exchange(port, ok)
    assert status == 200
    assert pop.counters.requests == 1


@dataclass
class Upload:
    """What the recording backend got of one request."""

    head: bytes = b""
    body: bytearray = field(default_factory=bytearray)
    closed: bool = False  # the proxy closed the connection

    @property
    def complete(self) -> bool:
        return self.body.endswith(b"0\r\n\r\n")


class RecordingBackend:
    """A raw HTTP/1.1 backend: /version as JSON; a chunked request is recorded byte by
    byte (answered 200 only once complete); the ``bad_heads`` paths answer with
    response heads nobody should relay."""

    def __init__(self) -> None:
        self.uploads: list[Upload] = []
        self.api_connections: list[Upload] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not await self._answer(head, reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def _answer(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        path = head.split(b" ", 2)[1]
        if path == b"/version":
            self._write(writer, b"200 OK", b'{"prompt": "v1"}')
            return True
        upload = Upload(head)
        self.api_connections.append(upload)
        if b"chunked" in head.lower():
            self.uploads.append(upload)
            while not upload.complete:
                chunk = await reader.read(65536)
                if not chunk:
                    upload.closed = True
                    return False
                upload.body += chunk
        elif b"content-length:" in head.lower():
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            upload.body += await reader.readexactly(length)
        bad = BAD_HEADS.get(path.decode())
        if bad is not None:
            try:
                writer.write(b"HTTP/1.1 200 OK\r\n")
                for part in bad():
                    writer.write(part)
                    await writer.drain()
                writer.write(b"Content-Length: 2\r\n\r\nok")
                await writer.drain()
                upload.closed = await reader.read() == b""
            except ConnectionError:
                upload.closed = True  # cut off while still sending the head
            return False
        self._write(writer, b"200 OK", b'{"ok": true}')
        return True

    @staticmethod
    def _write(writer: asyncio.StreamWriter, status: bytes, body: bytes) -> None:
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _huge() -> list[bytes]:  # a 16 MiB head: 2048 headers of 8 KiB
    line = b"X-Evil-%04d: " + b"e" * (8 * KIB - 20) + b"\r\n"
    return [b"".join(line % i for i in range(start, start + 64)) for start in range(0, 2048, 64)]


def _many() -> list[bytes]:  # 20,000 headers
    return [b"".join(b"X-Evil-%d: 1\r\n" % i for i in range(start, start + 1000))
            for start in range(0, 20_000, 1000)]


def _one_long() -> list[bytes]:  # a single 1 MiB header
    return [b"X-Evil: " + b"e" * KIB * KIB + b"\r\n"]


BAD_HEADS: dict[str, Callable[[], list[bytes]]] = {
    "/huge-head": _huge, "/many-headers": _many, "/one-long-header": _one_long,
}


@pytest_asyncio.fixture
async def recording() -> AsyncIterator[RecordingBackend]:
    backend = RecordingBackend()
    server = await asyncio.start_server(backend.serve, "127.0.0.1", 0)
    backend.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield backend
    for writer in backend.writers:
        writer.close()
    server.close()
    await server.wait_closed()


async def _behind(start_proxy: StartProxy, backend: RecordingBackend,
                  **sections: dict[str, Any]) -> RunningProxy:
    proxy = await start_proxy(
        [], backends=[{"id": "rec", "region": "r1", "url": backend.url}], **sections)
    await wait_routable(proxy, "rec")
    return proxy


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_chunked_body_growing_over_the_cap_gets_413_and_the_upstream_request_is_aborted(
    streamed: bool, recording: RecordingBackend, start_proxy: StartProxy,
) -> None:
    # Held: read whole before anything is sent, so nothing is; streamed (over 16
    # bytes): already on its way upstream when it passes the cap, and cut off there.
    upstream = {"max_buffered_body_bytes": 16} if streamed else {}
    proxy = await _behind(start_proxy, recording, listen={"max_request_body_bytes": 1000},
                          upstream=upstream)
    head = (b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n")
    chunk = b"190\r\n" + b"c" * 400 + b"\r\n"  # 400 bytes each: the third passes 1000
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    try:
        writer.write(head + chunk)
        if streamed:
            await _poll(lambda: len(recording.uploads) == 1)  # on its way upstream
        writer.write(chunk * 4 + b"0\r\n\r\n")
        answer = await asyncio.wait_for(_read_answer(reader), 10)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and closed
    finally:
        writer.close()
    _error(answer, 413, "request_body_too_large")
    assert proxy.metric("pinproxy_bad_http_requests_total", listener="data",
                        reason="body_too_large") == 1
    if not streamed:
        assert recording.api_connections == []
        return
    [upload] = recording.uploads
    await _poll(lambda: upload.closed)  # the upstream request was aborted ...
    assert not upload.complete  # ... before the backend had the whole request
    assert len(upload.body) < 1000 + 5 * len(b"190\r\n\r\n")


async def test_a_chunked_body_under_the_cap_is_forwarded_whole(
    recording: RecordingBackend, start_proxy: StartProxy,
) -> None:
    proxy = await _behind(start_proxy, recording, listen={"max_request_body_bytes": 1000},
                          upstream={"max_buffered_body_bytes": 16})
    head = (b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n")
    [(status, _, body)] = await _exchange(
        port_of(proxy.url), head + (b"190\r\n" + b"c" * 400 + b"\r\n") * 2 + b"0\r\n\r\n")
    assert status == 200, body
    [upload] = recording.uploads
    assert upload.complete


# --- response heads --------------------------------------------------------------------


@pytest.mark.parametrize("path", list(BAD_HEADS))
@pytest.mark.parametrize("body_kind", ["held", "streamed"])
async def test_a_response_head_over_the_cap_is_never_relayed_the_client_gets_502(
    path: str, body_kind: str, recording: RecordingBackend, start_proxy: StartProxy,
) -> None:
    # A body over 16 bytes is not held: it streams up while the head is awaited.
    upstream = {"max_buffered_body_bytes": 16} if body_kind == "streamed" else {}
    proxy = await _behind(start_proxy, recording, upstream=upstream)
    body = b'{"model": "m", "messages": []}'
    request = (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
               b"application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
               % len(body) + body)
    [answer] = await _exchange(port_of(proxy.url), request)
    _error(answer, 502, "upstream_head_too_large")
    assert not [name for name in answer[1] if name.startswith("x-evil")]
    connection = recording.api_connections[-1]
    await _poll(lambda: connection.closed)  # dropped, never pooled
    assert len(recording.api_connections) == 1  # and not retried
    ok = request.replace(path.encode(), b"/v1/fine", 1)
    [(status, _, _)] = await _exchange(port_of(proxy.url), ok)
    assert status == 200  # the next request is served as usual


async def test_the_admin_listener_has_the_same_head_cap(
    start_pop: StartPop, start_proxy: StartProxy,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], listen={"max_request_head_bytes": 2048})
    [answer] = await _exchange(port_of(proxy.admin_url), _big_head("/admin/backends", 3, 1000))
    _error(answer, 431, "request_head_too_large")
    assert proxy.metric("pinproxy_bad_http_requests_total", listener="admin",
                        reason="head_too_large") == 1
