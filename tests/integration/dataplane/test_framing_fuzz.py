"""A short raw-socket fuzz of HTTP/1.1 request framing, against a recording backend.

Pipelined requests, valid and malformed (conflicting lengths, bad chunk sizes, bare
LFs, obs-folds, smuggling attempts), go to a real pinproxy on one connection. The
backend (a real sim POP) records what reaches it. Whatever the bytes: every request the
backend saw was answered to the client (forwarded never exceeds accepted), none of them
was refused by the proxy, and no request hidden inside another one's body or headers
(a ``/smuggled`` path) ever reaches the backend.

pinproxy and the POP run on their own event loop in a thread, so that hypothesis can
drive plain blocking sockets example after example against the same pair.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from proxy.config.settings import settings_from_mapping
from proxy.runtime.instance import running_proxy
from proxy.sim import PopState, SimPop
from tests.fixtures.proxy import proxy_config


@dataclass
class Pair:
    loop: asyncio.AbstractEventLoop
    pop: SimPop
    port: int

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def paths(self) -> list[str]:
        async def read() -> list[str]:
            return [r.path for r in self.pop.requests]

        result: list[str] = self.call(read())
        return result


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    stack = AsyncExitStack()

    async def start() -> tuple[SimPop, int]:
        pop = SimPop(PopState.create("pop-1", "r1", "v1"), max_records=100_000)
        await pop.start("127.0.0.1", 0)
        settings = settings_from_mapping(
            proxy_config([pop], upstream={"max_buffered_body_bytes": 64},
                         listen={"max_request_head_bytes": 65536,
                                 "max_request_body_bytes": 300},
                         admin={"enabled": False})
        )
        running = await stack.enter_async_context(
            running_proxy(settings, metrics_registry=CollectorRegistry())
        )
        return pop, running.data_addresses[0][1]

    future: Future[tuple[SimPop, int]] = asyncio.run_coroutine_threadsafe(start(), loop)
    pop, port = future.result(20)
    pair = Pair(loop, pop, port)
    _wait_ready(pair)
    yield pair
    pair.call(stack.aclose())
    pair.call(pop.stop())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _wait_ready(pair: Pair) -> None:
    # The proxy answers 503 until discovery has polled the POP once.
    for _ in range(40):  # each refusal waits routing.pin_wait_ms (500 ms) first
        status, _ = _exchange(pair.port, END)
        if status == [200]:
            return
    raise AssertionError("the proxy never became ready")


_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


END = b"GET /anything/end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _exchange(port: int, data: bytes) -> tuple[list[int], bytes]:
    """Send ``data``; every response status the proxy sent back until it closed.

    No half-close: aiohttp takes one for a client that hung up and cancels the request
    in flight. ``data`` ends with ``END``, after which the proxy closes (or it closed
    sooner, refusing something).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return [int(m) for m in _STATUS.findall(received)], received


SMUGGLED = b"GET /anything/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
BODY = b'{"a": 1}'

# Each piece is one request as a client might frame it; the malformed ones are those an
# edge proxy has to refuse, or frame exactly as the backend will.
PIECES: list[bytes] = [
    b"GET /anything/ok HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /anything/ok HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n" + BODY,
    b"POST /anything/ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"8\r\n" + BODY + b"\r\n0\r\n\r\n",
    # Both lengths: a smuggling classic (CL.TE / TE.CL).
    b"POST /anything/clte HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    b"POST /anything/tecl HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 50\r\n\r\n0\r\n\r\n" + SMUGGLED,
    b"POST /anything/dupcl HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nContent-Length: 50\r\n"
    b"\r\n" + BODY + SMUGGLED,
    # Chunked is the final coding, so the body ends at "0": what follows is pipelined.
    b"POST /anything/badte HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"0\r\n\r\nGET /anything/after HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /anything/tespace HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n"
    b"0\r\n\r\n" + SMUGGLED,
    b"POST /anything/badchunk HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\n" + SMUGGLED,
    b"POST /anything/negcl HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" + SMUGGLED,
    b"POST /anything/pluscl HTTP/1.1\r\nHost: x\r\nContent-Length: +8\r\n\r\n" + BODY,
    b"GET /anything/fold HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",
    b"GET /anything/barelf HTTP/1.1\nHost: x\n\n",
    b"GET /anything/nul HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    b"GET /anything/space HTTP/1.1\r\nHost: x\r\nX-A : 1\r\n\r\n",
    b"GET /anything/http2 HTTP/2.0\r\nHost: x\r\n\r\n",
    b"GET  /anything/twospaces HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\r\n",
    b"garbage\r\n\r\n",
    # Refused by the edge's own rules rather than the parser's.
    b"TRACE /anything/trace HTTP/1.1\r\nHost: x\r\nCookie: c=1\r\n\r\n",
    b"GET http://evil.example/anything/absolute HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /anything/bighead HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-Big-%d: %s\r\n" % (i, b"h" * 8000) for i in range(10)) + b"\r\n",
    b"POST /anything/bigbody HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"100\r\n" + b"b" * 256 + b"\r\n" + b"100\r\n" + b"b" * 256 + b"\r\n0\r\n\r\n",
]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(sequence=st.lists(st.sampled_from(range(len(PIECES))), min_size=1, max_size=5))
@example(sequence=[3])  # CL.TE
@example(sequence=[4, 0])  # TE.CL, then a valid request
@example(sequence=[5])  # two Content-Lengths
@example(sequence=[0, 1, 2])  # valid, pipelined
@example(sequence=[0, 19, 0])  # TRACE between valid requests
@example(sequence=[0, 21])  # a head over the cap after a valid request
@example(sequence=[22, 0])  # a chunked body over the cap, then a request in its wake
def test_requests_forwarded_never_exceed_requests_accepted(
    pair: Pair, sequence: list[int]
) -> None:
    data = b"".join(PIECES[i] for i in sequence) + END
    before = len(pair.paths())
    statuses, received = _exchange(pair.port, data)
    forwarded = pair.paths()[before:]
    accepted = [s for s in statuses if s == 200]
    assert len(forwarded) <= len(accepted), (data, statuses, forwarded)
    # Every answer either came from the backend (200: the echo) or is the proxy's own
    # refusal: none of what was refused reached the backend.
    assert all(s == 200 or 400 <= s < 600 for s in statuses), received[:500]
    assert len(forwarded) == len(accepted), (data, statuses, forwarded)
    assert "/anything/smuggled" not in forwarded, (data, forwarded)
    refused = {"/anything/trace", "/anything/bighead", "/anything/bigbody"}
    assert not refused & set(forwarded), (data, forwarded)
