"""The answer's framing, decided as pure functions (proxy/dataplane/exchange.py)."""

from __future__ import annotations

import httptools
from hypothesis import given
from hypothesis import strategies as st

from proxy.dataplane.exchange import (
    LAST_CHUNK,
    Framing,
    body_framing,
    chunk,
    header_lines,
    response_head,
)


def test_a_whole_body_gets_its_own_length_unless_the_backend_declared_one() -> None:
    assert body_framing("GET", 200, (1, 1), None, 5) == (Framing.LENGTH, 5)
    assert body_framing("GET", 200, (1, 1), "5", 5) == (Framing.LENGTH, 5)


def test_a_streamed_body_is_chunked_on_1_1_and_closes_on_1_0() -> None:
    assert body_framing("POST", 200, (1, 1), None, None) == (Framing.CHUNKED, None)
    assert body_framing("POST", 200, (1, 0), None, None) == (Framing.CLOSE, None)
    assert body_framing("POST", 200, (1, 0), "7", None) == (Framing.LENGTH, 7)


def test_head_keeps_the_declared_length_and_sends_no_body() -> None:
    assert body_framing("HEAD", 200, (1, 1), "123", 0) == (Framing.NONE, 123)
    assert body_framing("HEAD", 200, (1, 1), None, 0) == (Framing.NONE, 0)


def test_no_body_statuses_carry_no_length() -> None:
    for status in (101, 204, 304):
        assert body_framing("GET", status, (1, 1), "9", 9) == (Framing.NONE, None)


def test_the_head_replaces_what_the_server_sets_and_names_the_banner() -> None:
    lines, declared = header_lines(
        [("Content-Type", "text/plain"), ("Connection", "keep-alive"), ("Server", "backend"),
         ("Content-Length", "99"), ("Transfer-Encoding", "chunked")]
    )
    assert declared == "99"
    head = response_head(
        200, None, lines, framing=Framing.LENGTH, content_length=2, keep_alive=False,
        banner="edge",
    )
    assert head == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                    b"Server: edge\r\nConnection: close\r\n\r\n")


def test_header_lines_keep_order_and_declare_the_first_content_length_in_any_case() -> None:
    lines, declared = header_lines(
        [("X-B", "1"), ("content-LENGTH", "7"), ("X-A", "2"), ("Content-Length", "9"),
         ("keep-alive", "timeout=5")]
    )
    assert lines == ["X-B: 1\r\n", "X-A: 2\r\n"]
    assert declared == "7"
    assert header_lines([("X-A", "1")]) == (["X-A: 1\r\n"], None)


def test_an_http_1_0_answer_kept_alive_says_so() -> None:
    head = response_head(200, "Fine", [], framing=Framing.LENGTH, content_length=0,
                         keep_alive=True, http10=True)
    assert head == b"HTTP/1.1 200 Fine\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"


def test_an_unprintable_reason_is_replaced_by_the_standard_one() -> None:
    head = response_head(404, "bad\r\nX-Injected: 1", [], framing=Framing.NONE,
                         content_length=None, keep_alive=True)
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"X-Injected" not in head


class _Parsed:
    def __init__(self) -> None:
        self.body = bytearray()
        self.done = False
        self.headers: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


@given(
    status=st.sampled_from([200, 201, 400, 404, 429, 500, 502, 503]),
    method=st.sampled_from(["GET", "POST", "HEAD"]),
    version=st.sampled_from([(1, 0), (1, 1)]),
    declared=st.booleans(),
    pieces=st.lists(st.binary(max_size=64), max_size=8),
)
def test_every_framed_answer_parses_back_to_the_same_body(
    status: int, method: str, version: tuple[int, int], declared: bool, pieces: list[bytes],
) -> None:
    """Whatever the framing chosen, a client's parser reads back exactly the body sent."""
    body = b"".join(pieces)
    framing, length = body_framing(method, status, version, str(len(body)) if declared else None,
                                   None)
    head = response_head(status, None, ["X-A: 1\r\n"], framing=framing, content_length=length,
                         keep_alive=framing is not Framing.CLOSE)
    wire = bytearray(head)
    if framing is Framing.CHUNKED:
        wire += b"".join(chunk(p) for p in pieces if p) + LAST_CHUNK
    elif framing is not Framing.NONE:
        wire += body
    parsed = _Parsed()
    parser = httptools.HttpResponseParser(parsed)
    if method == "HEAD":
        assert bytes(wire) == head  # nothing follows the head of a HEAD answer
        return
    parser.feed_data(bytes(wire))
    if framing is Framing.CLOSE:
        parser.feed_data(b"")  # the end of the connection ends the body
    assert bytes(parsed.body) == body
    assert (b"x-a", b"1") in parsed.headers
