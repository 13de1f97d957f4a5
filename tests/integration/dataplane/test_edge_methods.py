"""Methods and banners at the edge, over real sockets: TRACE and TRACK are answered 405
and never forwarded; no answer on either listener names the software behind it."""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.raw_http import port_of, send_raw
from tests.fixtures.sim import StartPop


@pytest.mark.parametrize("method", ["TRACE", "TRACK"])
async def test_trace_and_track_get_405_with_allow_and_are_never_forwarded(
    method: str, start_pop: StartPop, start_proxy: StartProxy,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    raw = await send_raw(port_of(proxy.url), (
        f"{method} /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        "Authorization: Bearer sk-secret-key\r\nCookie: session=secret-cookie\r\n"
        "X-Session-ID: s1\r\nConnection: close\r\n\r\n").encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    # (TRACK is no method llhttp parses: answered as its parse error is, in HTTP/1.0.)
    assert head.split(b" ", 2)[1] == b"405", raw
    assert b"\r\nAllow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS" in head
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "method_not_allowed")
    assert b"secret" not in raw  # nothing of the request is echoed
    assert pop.requests == []
    assert pop.counters.requests == 0


async def _answers(proxy: RunningProxy, http: aiohttp.ClientSession) -> list[tuple[str, str]]:
    """(what, the Server headers) of an answer of every kind, from both listeners."""
    token = proxy.admin_headers
    got: list[tuple[str, str]] = []
    for what, url, method, headers in [
        ("proxied", f"{proxy.url}/v1/models", "GET", {}),
        ("proxied stream", f"{proxy.url}/v1/chat/completions", "POST", {}),
        ("refused", f"{proxy.url}/v1/x", "TRACE", {}),
        ("health", f"{proxy.url}/_pinproxy/healthz", "GET", {}),
        ("ready", f"{proxy.url}/_pinproxy/readyz", "GET", {}),
        ("admin", f"{proxy.admin_url}/admin/backends", "GET", token),
        ("admin 401", f"{proxy.admin_url}/admin/backends", "GET",
         {"Authorization": "Bearer wrong"}),
        ("admin 404", f"{proxy.admin_url}/nowhere", "GET", token),
    ]:
        body = {"model": "m", "stream": True, "messages": []} if method == "POST" else None
        async with http.request(method, url, headers=headers, json=body) as resp:
            await resp.read()
            got.append((what, ",".join(resp.headers.getall("Server", []))))
    for what, url in (("malformed", proxy.url), ("admin malformed", proxy.admin_url)):
        port = port_of(url)
        raw = await send_raw(port, b"GET /x HTTP/1.1\r\nBad Header: 1\r\n\r\n")
        head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").lower().split("\r\n")
        got.append((what, ",".join(
            line.split(":", 1)[1].strip() for line in head if line.startswith("server:"))))
    return got


async def test_no_answer_carries_a_server_banner(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], admin={"token": "t" * 32})
    async with http.get(f"{pop.url}/v1/models") as resp:
        assert "aiohttp" in resp.headers["Server"]  # the backend has one of its own
    answers = await _answers(proxy, http)
    assert answers == [(what, "") for what, _ in answers]


async def test_the_server_header_is_the_configured_one_when_set(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], admin={"token": "t" * 32},
                              listen={"server_header": "edge proxy"})
    answers = await _answers(proxy, http)
    assert answers == [(what, "edge proxy") for what, _ in answers]
