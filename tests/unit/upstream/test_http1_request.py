"""What the upstream client writes: ``Target`` (origin, Host, prefix) and ``request_bytes``."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.upstream.framing import Target, request_bytes

# --- Target -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "origin", "host_header", "prefix"),
    [
        ("http://backend", ("http", "backend", 80), "backend", ""),
        ("http://backend:80", ("http", "backend", 80), "backend", ""),
        ("http://backend:8080", ("http", "backend", 8080), "backend:8080", ""),
        ("https://backend", ("https", "backend", 443), "backend", ""),
        ("https://backend:443/v1/", ("https", "backend", 443), "backend", "/v1"),
        # A default port is the scheme's own: 80 over https is shown.
        ("https://backend:80", ("https", "backend", 80), "backend:80", ""),
        ("http://10.0.0.7:8000/a/b/", ("http", "10.0.0.7", 8000), "10.0.0.7:8000", "/a/b"),
        ("http://[::1]", ("http", "::1", 80), "[::1]", ""),
        ("http://[::1]:8000/base", ("http", "::1", 8000), "[::1]:8000", "/base"),
        ("https://[2001:db8::1]:443/", ("https", "2001:db8::1", 443), "[2001:db8::1]", ""),
    ],
)
def test_target_splits_a_base_url_into_origin_host_header_and_prefix(
    base_url: str, origin: tuple[str, str, int], host_header: str, prefix: str
) -> None:
    target = Target(base_url)
    assert target.origin == origin
    assert target.host_header == host_header
    assert target.prefix == prefix


# --- request_bytes ------------------------------------------------------------------------


def test_request_is_one_head_then_the_body() -> None:
    wire = request_bytes(
        "POST", "/v1/chat?x=1", "backend:8080", {"Content-Type": "application/json"}, b'{"a":1}'
    )
    assert wire == (
        b"POST /v1/chat?x=1 HTTP/1.1\r\n"
        b"Host: backend:8080\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: 7\r\n"
        b"\r\n"
        b'{"a":1}'
    )


@pytest.mark.parametrize(
    ("method", "body", "content_length"),
    [
        # Methods that anticipate no content send no Content-Length for an empty body ...
        ("GET", b"", None),
        ("HEAD", b"", None),
        ("OPTIONS", b"", None),
        ("TRACE", b"", None),
        # ... the others send 0, as the client's own would.
        ("POST", b"", b"0"),
        ("PUT", b"", b"0"),
        ("PATCH", b"", b"0"),
        ("DELETE", b"", b"0"),
        # Any body gets its length, whatever the method.
        ("GET", b"abc", b"3"),
        ("POST", b"\x00" * 1000, b"1000"),
        ("DELETE", b"x", b"1"),
    ],
)
def test_content_length_follows_the_method_and_body(
    method: str, body: bytes, content_length: bytes | None
) -> None:
    wire = request_bytes(method, "/", "h", {}, body)
    head, _, sent_body = wire.partition(b"\r\n\r\n")
    lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    assert lengths == ([] if content_length is None else [b"Content-Length: " + content_length])
    assert sent_body == body


def test_headers_keep_their_order_and_repeats() -> None:
    headers = CIMultiDict([("X-B", "1"), ("X-A", "2"), ("X-B", "3")])
    wire = request_bytes("GET", "/", "h", headers, b"")
    assert wire == b"GET / HTTP/1.1\r\nHost: h\r\nX-B: 1\r\nX-A: 2\r\nX-B: 3\r\n\r\n"


def test_non_utf8_header_bytes_go_out_as_they_came_in() -> None:
    raw = b"\xff\xfe latin-1: caf\xe9"
    value = raw.decode("utf-8", "surrogateescape")  # how such a value is held as str
    wire = request_bytes("GET", "/", "h", {"X-Raw": value, "X-Utf8": "café"}, b"")
    assert b"\r\nX-Raw: " + raw + b"\r\n" in wire
    assert b"\r\nX-Utf8: caf\xc3\xa9\r\n" in wire
