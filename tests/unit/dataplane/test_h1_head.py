"""The edge's head rules (proxy/dataplane/h1_head.py), on llhttp's own refusals."""

from __future__ import annotations

import httptools
import pytest

from proxy.dataplane.edge_options import EdgeOptions
from proxy.dataplane.h1_head import (
    HeadRefused,
    checked_head,
    parse_error_answer,
)

OPTIONS = EdgeOptions(
    name="data", head_timeout_s=5.0, keepalive_timeout_s=5.0, max_connections=10,
    max_connections_per_ip=10, retry_after_s=1, max_head_bytes=1024, max_body_bytes=100,
    server_header="",
)


def parser_error(data: bytes) -> httptools.HttpParserError:
    """What llhttp raises for ``data`` (the real parser, not a made-up error)."""
    parser = httptools.HttpRequestParser(object())
    with pytest.raises(httptools.HttpParserError) as caught:
        parser.feed_data(data)
    return caught.value


def test_a_head_within_the_caps_is_decoded_with_its_version() -> None:
    headers, version = checked_head(
        "POST", "/v1/chat", [(b"Content-Length", b"100"), (b"X-A", b"\xff")], "1.0", OPTIONS
    )
    assert version == (1, 0)
    assert headers["content-length"] == "100"
    assert headers["X-A"] == "\udcff"  # undecodable bytes kept, as aiohttp


@pytest.mark.parametrize(
    ("raw", "version", "reason", "status"),
    [
        ([(b"X-Big", b"x" * 1024)], "1.1", "head_too_large", 431),
        ([(b"Content-Length", b"101")], "1.1", "body_too_large", 413),
        ([], "2.0", "request_line", 400),
    ],
)
def test_a_head_over_a_cap_or_of_another_version_is_refused(
    raw: list[tuple[bytes, bytes]], version: str, reason: str, status: int
) -> None:
    with pytest.raises(HeadRefused) as refused:
        checked_head("GET", "/", raw, version, OPTIONS)
    assert refused.value.reason == reason
    assert refused.value.error.status == status


def test_what_llhttp_refuses_is_a_counted_400() -> None:
    exc = parser_error(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    reason, error = parse_error_answer(exc, b"GET / HTTP/1.1\r\n")
    assert reason == "content_length"
    assert (error.status, error.code) == (400, "bad_http_request")


def test_an_unknown_refused_method_is_a_405_and_not_counted() -> None:
    head = b"TRACK / HTTP/1.1\r\n\r\n"
    reason, error = parse_error_answer(parser_error(head), head[:16])
    assert reason is None
    assert error.status == 405
