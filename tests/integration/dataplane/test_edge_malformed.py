"""Malformed HTTP over real sockets: a JSON 400 (never aiohttp's text echoing the bytes),
one rate-limited warning instead of a traceback per request, and a counter."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import pytest

from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.sim import StartPop


async def _raw(port: int, data: bytes, *, then: bytes = b"", timeout: float = 5) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if then:
            writer.write(then)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def _port(proxy: RunningProxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


def _json_answer(answer: bytes, status: int) -> dict[str, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode(), answer
    assert b"Content-Type: application/json" in head, answer
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["message"].startswith("malformed request: ")
    assert error["type"] == "invalid_request_error"
    return error


MALFORMED = [
    (b"GARBAGE\r\n\r\n", "method", b"GARBAGE"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", "method", b"\x16\x03"),
    (b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", "header", b"Bad Header"),
    (b"GET /x HTTP/1.1\r\nHost: x\r\nX-Evil: a\x01<script>\r\n\r\n", "header", b"<script>"),
    (b"GET /x HTTP/1.1\r\nHost: x\r\n X-Folded: 1\r\n\r\n", "header", b"X-Folded"),
    (b"GET /x\x00<script> HTTP/1.1\r\nHost: x\r\n\r\n", "target", b"<script>"),
    (b"GET /x HTTP/9.9\r\nHost: x\r\n\r\n", "request_line", b"9.9"),
    (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", "content_length", b"abc"),
    (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
     "content_length", b"Content-Length: 2"),
    (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "body_framing", b"smuggled"),
    (b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", "body_framing", b"gzip"),
]


@pytest.mark.parametrize(("raw", "reason", "echo"), MALFORMED)
async def test_malformed_http_gets_a_json_400_that_echoes_nothing(
    raw: bytes, reason: str, echo: bytes, start_pop: StartPop, start_proxy: StartProxy,
    http: aiohttp.ClientSession,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    answer = await _raw(_port(proxy), raw)
    error = _json_answer(answer, 400)
    assert error["code"] == "bad_http_request"
    assert echo not in answer
    assert proxy.metric("pinproxy_bad_http_requests_total", listener="data", reason=reason) == 1
    assert pop.requests == []
    async with http.get(f"{proxy.url}/anything/after") as resp:
        assert resp.status == 200  # the proxy is fine afterwards


@pytest.mark.parametrize("raw", [
    b"GET /x HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
])
async def test_an_oversized_line_or_too_many_headers_get_a_json_431(
    raw: bytes, start_pop: StartPop, start_proxy: StartProxy
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    error = _json_answer(await _raw(_port(proxy), raw), 431)
    assert error["code"] == "request_head_too_large"
    assert proxy.metric("pinproxy_bad_http_requests_total", listener="data",
                        reason="head_too_large") == 1
    assert pop.requests == []


@pytest.mark.parametrize("held", [True, False])
async def test_broken_chunked_framing_mid_body_gets_a_json_400_not_a_hang(
    held: bool, start_pop: StartPop, start_proxy: StartProxy
) -> None:
    pop = await start_pop()
    # Held: the body is read whole before anything is sent; streamed (over 16 bytes):
    # the upstream request is under way when the framing breaks, and is aborted.
    upstream = {} if held else {"max_buffered_body_bytes": 16}
    proxy = await start_proxy([pop], upstream=upstream)
    head = (b"POST /anything/chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n")
    good = b"20\r\n" + b"x" * 32 + b"\r\n"
    answer = await _raw(_port(proxy), head + good, then=b"ZZ\r\n<evil>\r\n0\r\n\r\n")
    error = _json_answer(answer, 400)
    assert error["code"] == "bad_http_request"
    assert b"<evil>" not in answer
    assert proxy.metric("pinproxy_bad_http_requests_total", listener="data",
                        reason="body_framing") == 1
    # Nothing complete reached the backend: the sim records only requests it finished.
    assert pop.requests == []


async def test_a_flood_of_malformed_requests_logs_one_warning_and_no_traceback(
    start_pop: StartPop, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    for raw, _reason, _echo in MALFORMED * 3:
        await _raw(_port(proxy), raw)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert not [r for r in caplog.records if r.exc_info]
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and "malformed HTTP" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "127.0.0.1" in warnings[0].getMessage()
    total = sum(proxy.metric("pinproxy_bad_http_requests_total", listener="data", reason=r)
                for r in {reason for _raw_bytes, reason, _echo in MALFORMED})
    assert total == len(MALFORMED) * 3


async def test_malformed_http_on_the_admin_port_is_json_too(
    start_pop: StartPop, start_proxy: StartProxy
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    error = _json_answer(await _raw(int(proxy.admin_url.rsplit(":", 1)[1]), MALFORMED[2][0]), 400)
    assert error["code"] == "bad_http_request"
    assert proxy.metric("pinproxy_bad_http_requests_total", listener="admin",
                        reason="header") == 1
