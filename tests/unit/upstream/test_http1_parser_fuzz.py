"""The upstream client's response parsing (llhttp callbacks in ``http1.Connection``), fuzzed.

Each example runs a ``Connection`` on a real socket pair: the response bytes are handed
to ``data_received`` at exactly the generated split points (TCP would coalesce them),
then the backend's end closes, for real. Whatever the bytes, the client must produce a
response or an ``UpstreamError``, never crash and never wait once the backend is gone;
a valid response must read the same however it was split; and a connection that saw
anything past its response must never be reused.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from dataclasses import dataclass, field

from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.core.errors import UpstreamError
from proxy.upstream.http1 import Connection

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=8).filter(
    lambda name: name.lower() not in {"content-length", "transfer-encoding", "connection"}
)
VALUE = st.text(alphabet="abcXYZ 0123456789;=/", max_size=12).map(str.strip)


@dataclass
class Owner:
    """The pool's side of a connection: what came back idle, what was forgotten."""

    idle: list[Connection] = field(default_factory=list)
    forgotten: list[Connection] = field(default_factory=list)

    def put_idle(self, conn: Connection) -> None:
        self.idle.append(conn)

    def forget(self, conn: Connection) -> None:
        self.forgotten.append(conn)


@dataclass
class Outcome:
    status: int | None = None  # None: an UpstreamError
    body: bytes = b""
    reused: bool = False


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


async def _run(data: bytes, cuts: list[int], *, close: bool, method: str = "GET") -> Outcome:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    owner = Owner()
    transport, conn = await loop.connect_accepted_socket(
        lambda: Connection(owner, ("http", "backend", 80), idle_timeout_s=30.0), ours
    )
    try:
        conn.send(f"{method} / HTTP/1.1\r\nHost: backend\r\n\r\n".encode(),
                  head_only=method == "HEAD")
        for piece in _pieces(data, cuts):
            if conn.closed:
                break
            conn.data_received(piece)  # must never raise
        if close:
            # The backend read the request (closing with it unread would be a reset).
            theirs.settimeout(2)
            assert theirs.recv(1024).startswith(f"{method} / ".encode())
            theirs.close()
        outcome = Outcome()
        try:
            # Once the backend is gone nothing may wait: 2 s is "forever" here.
            head = await asyncio.wait_for(conn.read_head(), 2 if close else 0.2)
            outcome.status = head.status
            while chunk := await asyncio.wait_for(head.read_chunk(), 2 if close else 0.2):
                outcome.body += chunk
            head.release()
            outcome.reused = conn in owner.idle
        except UpstreamError:
            outcome.status = None
        return outcome
    finally:
        transport.close()
        theirs.close()


def run(data: bytes, cuts: list[int], *, close: bool = True, method: str = "GET") -> Outcome:
    return asyncio.run(_run(data, cuts, close=close, method=method))


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, int, bytes, str]:
    """A valid response: (bytes, status, body, framing)."""
    status = draw(st.sampled_from([200, 201, 204, 304, 400, 404, 409, 500, 503]))
    body = b"" if status in (204, 304) else draw(st.binary(max_size=300))
    framing = "none" if status in (204, 304) else draw(
        st.sampled_from(["length", "chunked", "eof"])
    )
    head = [f"HTTP/1.1 {status} {draw(st.sampled_from(['OK', 'Whatever', '']))}"]
    head += [f"{n}: {v}" for n, v in draw(st.lists(st.tuples(TOKEN, VALUE), max_size=4))]
    if draw(st.booleans()):
        head = ["HTTP/1.1 100 Continue", "", *head]  # an interim answer first
    payload = body
    if framing == "length":
        head.append(f"Content-Length: {len(body)}")
    elif framing == "chunked":
        head.append("Transfer-Encoding: chunked")
        sizes = draw(st.lists(st.integers(1, 64), max_size=8))
        chunks, rest = [], body
        for size in sizes:
            if rest:
                chunks.append(rest[:size])
                rest = rest[size:]
        if rest:
            chunks.append(rest)
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    elif framing == "eof":
        head.append("Connection: close")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
    return raw, status, body, framing


@settings(max_examples=150, deadline=None)
@given(response=responses(), cuts=st.lists(st.integers(0, 2000), max_size=8))
@example(response=(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                   b"\r\nhi", 200, b"hi", "length"), cuts=[26, 27])
def test_a_valid_response_reads_the_same_however_it_is_split(
    response: tuple[bytes, int, bytes, str], cuts: list[int]
) -> None:
    raw, status, body, framing = response
    # Framed responses are complete without the end of the connection, so keep it open.
    outcome = run(raw, cuts, close=framing == "eof")
    assert (outcome.status, outcome.body) == (status, body), (raw, cuts)
    assert outcome.reused == (framing != "eof")


@settings(max_examples=100, deadline=None)
@given(response=responses(), extra=st.binary(min_size=1, max_size=40),
       cuts=st.lists(st.integers(0, 2000), max_size=6))
@example(response=(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", 200, b"hi", "length"),
         extra=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray", cuts=[])
@example(response=(b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", "none"), extra=b"x", cuts=[])
def test_a_connection_with_bytes_after_its_response_is_never_reused(
    response: tuple[bytes, int, bytes, str], extra: bytes, cuts: list[int]
) -> None:
    raw, _status, _body, framing = response
    outcome = run(raw + extra, cuts, close=framing == "eof")
    if extra.strip(b"\r\n"):
        assert not outcome.reused
    else:
        # Empty lines between messages are skipped by llhttp (RFC 9112 §2.2's
        # robustness rule) and leave nothing behind for the next response.
        assert outcome.reused == (framing != "eof")


@settings(max_examples=150, deadline=None)
@given(framing=st.sampled_from(["Content-Length: 7", "Content-Length: 0",
                                "Transfer-Encoding: chunked", "Connection: keep-alive", None]),
       headers=st.lists(st.tuples(TOKEN, VALUE), max_size=3), interim=st.booleans(),
       extra=st.binary(max_size=30), cuts=st.lists(st.integers(0, 300), max_size=6))
@example(framing="Content-Length: 0", headers=[], interim=False,
         extra=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", cuts=[])
# Found by this fuzz: llhttp took what followed a chunked-framed answer to HEAD as chunk
# framing, without a callback, so the connection looked clean and was reused.
@example(framing="Transfer-Encoding: chunked", headers=[], interim=False, extra=b"0", cuts=[])
@example(framing="Transfer-Encoding: chunked", headers=[], interim=True,
         extra=b"0\r\n\r\n", cuts=[20, 40, 41, 42])
def test_an_answer_to_head_has_no_body_and_is_reused_only_when_nothing_follows(
    framing: str | None, headers: list[tuple[str, str]], interim: bool, extra: bytes,
    cuts: list[int],
) -> None:
    head = ["HTTP/1.1 200 OK", *(f"{n}: {v}" for n, v in headers), *([framing] if framing else [])]
    if interim:
        head = ["HTTP/1.1 103 Early Hints", "Link: </a>", "", *head]
    raw = ("\r\n".join(head) + "\r\n\r\n").encode()
    outcome = run(raw + extra, cuts, close=False, method="HEAD")
    assert (outcome.status, outcome.body) == (200, b"")
    if not extra:
        assert outcome.reused  # its framing headers promise a body that never comes
    elif outcome.reused:
        # Only empty lines after a zero-length answer are skipped (as after any answer).
        assert framing == "Content-Length: 0"
        assert not extra.strip(b"\r\n")


def test_empty_lines_after_a_response_leave_the_connection_reusable() -> None:
    # Found by the fuzz above (extra=b"\r\n"): decided harmless, pinned here.
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi\r\n\r\n"
    assert run(raw, [], close=False) == Outcome(200, b"hi", reused=True)
    assert run(raw + b"HTTP/1.1 200 OK\r\n", [], close=False).reused is False


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=8))
@example(data=b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
         cuts=[])
@example(data=b"HTTP/1.1 100 Continue\r\n\r\n", cuts=[])  # only an interim answer
@example(data=b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", cuts=[3])
@example(data=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", cuts=[])
def test_any_bytes_give_a_response_or_an_upstream_error_and_never_hang(
    data: bytes, cuts: list[int]
) -> None:
    run(data, cuts)  # raises (failing the test) on a crash or a hang


def test_a_response_prefix_waits_while_the_backend_is_still_there() -> None:
    # The other side of "never hang": with the connection open, half a response is
    # waited for (the idle timeout ends it in the proxy), not answered early.
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"
    try:
        run(raw, [], close=False)
    except TimeoutError:
        return
    raise AssertionError("a half-sent body was taken as the whole response")
