"""The forwarding layer over real sockets: what reaches the backend, and what comes back.

Most tests put the proxy in front of a sim POP, whose catch-all echo reports exactly what
it received. Behaviours the sim cannot produce (redirects, gzip, hop-by-hop response
headers, a backend breaking mid-body) come from ``Tiny``, a small aiohttp backend.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from yarl import URL

from proxy.core.events import RequestEvent
from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.raw_http import port_of, send_raw
from tests.fixtures.sim import StartPop

TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD")
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings",
         "/anything/else", "/anything/a%2Fb/c%20d/%7e%2f", "/anything/./x/../y//z")
QUERY = "q=a%20b&q=c+d&slash=%2F&plus=1%2B1&empty=&q=3"
GZIPPED = gzip.compress(b'{"hello": "' + b"compressible " * 200 + b'"}')


def _url(proxy: RunningProxy, path_qs: str) -> URL:
    # encoded=True: the client sends the target exactly as written.
    return URL(proxy.url + path_qs, encoded=True)


async def _echo(http: aiohttp.ClientSession, proxy: RunningProxy, method: str = "GET",
                path_qs: str = "/anything/echo", **kwargs: Any) -> dict[str, Any]:
    async with http.request(method, _url(proxy, path_qs), **kwargs) as resp:
        assert resp.status == 200, await resp.text()
        echo: dict[str, Any] = await resp.json()
        echo["response_headers"] = resp.headers
        return echo


def _names(echo: dict[str, Any]) -> set[str]:
    return {name.lower() for name, _ in echo["header_items"]}


class Tiny:
    """A small aiohttp backend; ``requests`` lists (method, raw path) of non-/version calls."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.peer_ports: list[int] = []  # the proxy's end of each request's connection
        self.redirect_to = "http://127.0.0.1:9/never"
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/version", self._version)
        app.router.add_route("*", "/{tail:.*}", self._any)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"prompt": "v1"})

    async def _any(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.raw_path))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.peer_ports.append(peer[1] if peer else 0)
        await request.read()
        path = request.path
        if path == "/redirect":
            return web.Response(status=302, headers={"Location": self.redirect_to})
        if path == "/gzip":
            return web.Response(body=GZIPPED, content_type="application/json",
                                headers={"Content-Encoding": "gzip"})
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            if code in (204, 304):
                return web.Response(status=code, headers={"ETag": '"e1"'})
            headers = {"Retry-After": "7"} if code == 429 else {}
            return web.json_response({"error": {"message": f"backend says {code}",
                                                "type": "backend"}},
                                     status=code, reason=f"Reason {code}", headers=headers)
        if path == "/hop":
            return web.Response(text="hop", headers=[
                ("Connection", "X-Secret, x-other"), ("X-Secret", "1"), ("X-Other", "2"),
                ("Keep-Alive", "timeout=5"), ("Proxy-Connection", "keep-alive"),
                ("Upgrade", "h2c"), ("X-Kept", "yes"), ("X-Kept", "twice"),
                ("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2"),
            ])
        if path in ("/break/length", "/break/chunked"):
            resp = web.StreamResponse()
            if path == "/break/length":
                resp.content_length = 1000
            else:
                resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(b"a" * 200)
            await resp.write(b"b" * 300)
            assert request.transport is not None
            request.transport.close()  # the backend dies with the body half sent
            return resp
        return web.Response(text="tiny ok")


@pytest_asyncio.fixture
async def tiny() -> AsyncIterator[Tiny]:
    backend = Tiny()
    await backend.start()
    yield backend
    assert backend.runner is not None
    await backend.runner.cleanup()


class Decoy:
    """A listener the proxy must never connect to; counts connections."""

    connections = 0
    port = 0

    async def on_connect(self, _r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()


@pytest_asyncio.fixture
async def decoy() -> AsyncIterator[Decoy]:
    found = Decoy()
    server = await asyncio.start_server(found.on_connect, "127.0.0.1", 0)
    found.port = server.sockets[0].getsockname()[1]
    yield found
    server.close()
    await server.wait_closed()


async def _tiny_proxy(start_proxy: StartProxy, tiny: Tiny) -> RunningProxy:
    return await start_proxy([], backends=[{"id": "tiny", "region": "r1", "url": tiny.url}])


# --- 1. every method and path -----------------------------------------------------------


async def test_every_method_and_path_reaches_the_backend_byte_for_byte(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    sent = []
    for path in PATHS:
        for method in METHODS:
            data = b'{"model": "sim", "input": "x"}' if method in ("POST", "PUT", "PATCH") else None
            async with http.request(method, _url(proxy, f"{path}?{QUERY}"), data=data) as resp:
                await resp.read()
                assert resp.headers["X-Served-By"] == "pop-1"
            sent.append((method, path, QUERY))
    assert [(r.method, r.path, r.query_string) for r in pop.requests] == sent


async def test_upstream_host_is_the_backend_and_no_headers_are_invented(
    start_pop: StartPop, start_proxy: StartProxy
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    port = int(proxy.url.rsplit(":", 1)[1])
    raw = await send_raw(port, b"GET /anything/h HTTP/1.1\r\nHost: forged.example\r\n"
                           b"Connection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200"), raw
    record = pop.requests[-1]
    assert record.headers["Host"] == pop.url.removeprefix("http://")
    # Only what the proxy documents adding: no Accept, User-Agent, Accept-Encoding.
    assert {h.lower() for h in record.headers} == {
        "host", "x-forwarded-for", "x-forwarded-proto", "x-real-ip", "x-request-id",
        "traceparent"}


# --- 2. bodies --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 1024, 1025, 300_000])
async def test_bodies_arrive_byte_for_byte(
    size: int, start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], upstream={"max_buffered_body_bytes": 1024})
    body = os.urandom(size)
    for method in ("POST", "PUT", "PATCH"):
        # PATCH also says Expect: 100-continue, as curl does for large uploads.
        echo = await _echo(http, proxy, method, "/anything/upload?x=1", data=body,
                           expect100=method == "PATCH")
        assert (echo["body_len"], echo["body_sha256"]) == (size, hashlib.sha256(body).hexdigest())
        assert echo["headers"]["Content-Length"] == str(size)


@pytest.mark.parametrize("pieces", [3, 40])  # 3 * 333 B fits the buffer; 40 * 333 B does not
async def test_a_chunked_body_of_unknown_length_arrives_intact(
    pieces: int, start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], upstream={"max_buffered_body_bytes": 1024})
    chunks = [os.urandom(333) for _ in range(pieces)]

    async def gen() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk
            await asyncio.sleep(0)

    echo = await _echo(http, proxy, "POST", "/anything/chunked", data=gen())
    body = b"".join(chunks)
    assert (echo["body_len"], echo["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


# --- 3. hop-by-hop headers --------------------------------------------------------------


async def test_hop_by_hop_request_headers_are_dropped_end_to_end_ones_kept(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])

    async def gen() -> AsyncIterator[bytes]:
        yield b"chunked "
        yield b"body"

    headers = [
        ("Connection", "X-Foo, keep-alive"), ("Connection", "x-bar"), ("X-Foo", "1"),
        ("X-BAR", "2"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Upgrade", "h2c"),
        ("Proxy-Connection", "keep-alive"), ("Proxy-Authorization", "Basic cHJveHk6cHc="),
        ("Authorization", "Bearer sk-test-123"), ("X-Custom", "custom value"),
        ("X-Dup", "first"), ("X-Dup", "second"), ("Accept", "application/json"),
    ]
    echo = await _echo(http, proxy, "POST", "/anything/hop", data=gen(), headers=headers)
    names = _names(echo)
    for hop in ("connection", "x-foo", "x-bar", "keep-alive", "te", "upgrade",
                "proxy-connection", "proxy-authorization", "transfer-encoding"):
        assert hop not in names, (hop, echo["header_items"])
    items = [(k.lower(), v) for k, v in echo["header_items"]]
    assert ("authorization", "Bearer sk-test-123") in items
    assert ("x-custom", "custom value") in items
    assert ("accept", "application/json") in items
    assert [v for k, v in items if k == "x-dup"] == ["first", "second"]
    assert echo["body_len"] == len(b"chunked body")


async def test_hop_by_hop_response_headers_do_not_reach_the_client(
    tiny: Tiny, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await _tiny_proxy(start_proxy, tiny)
    async with http.get(_url(proxy, "/hop")) as resp:
        assert resp.status == 200
        assert await resp.text() == "hop"
        for hop in ("X-Secret", "X-Other", "Keep-Alive", "Proxy-Connection", "Upgrade"):
            assert hop not in resp.headers, (hop, resp.headers)
        assert "secret" not in resp.headers.get("Connection", "").lower()
        assert resp.headers.getall("X-Kept") == ["yes", "twice"]
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2"]


async def test_an_answer_to_head_keeps_the_backends_length_no_body_and_the_connection(
    tiny: Tiny, start_proxy: StartProxy
) -> None:
    # No quiet period: the GET may take the HEAD's connection at once.
    proxy = await start_proxy([], backends=[{"id": "tiny", "region": "r1", "url": tiny.url}],
                              upstream={"reuse_quiet_ms": 0})
    raw = await send_raw(port_of(proxy.url), b"HEAD /anything HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw
    assert b"\r\nContent-Length: 7\r\n" in head + b"\r\n"  # "tiny ok", as the backend said
    assert rest.startswith(b"HTTP/1.1 200"), raw  # no body came between the two answers
    assert rest.endswith(b"tiny ok")
    assert [m for m, _ in tiny.requests] == ["HEAD", "GET"]
    assert tiny.peer_ports[0] == tiny.peer_ports[1]  # one upstream connection for both


# --- 4. forwarding, request id, trace context, pinned version ---------------------------


async def test_forwarded_headers_request_id_and_traceparent(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    echo = await _echo(http, proxy, headers=[
        ("X-Forwarded-For", "203.0.113.7, 198.51.100.1"), ("X-Forwarded-For", "192.0.2.9"),
        ("X-Forwarded-Proto", "https"), ("X-Request-ID", "req-abc.123:x/y+z="),
        ("traceparent", TP), ("tracestate", "k=v")])
    # Nobody is trusted: the client's chain is replaced by the socket's peer.
    assert echo["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert len([k for k, _ in echo["header_items"] if k.lower() == "x-forwarded-for"]) == 1
    assert echo["headers"]["X-Forwarded-Proto"] == "http"  # a client cannot claim https
    assert echo["headers"]["X-Request-ID"] == "req-abc.123:x/y+z="
    assert echo["response_headers"]["X-Request-ID"] == "req-abc.123:x/y+z="
    assert echo["headers"]["traceparent"] == TP
    assert echo["headers"]["tracestate"] == "k=v"

    echo = await _echo(http, proxy)  # nothing sent: all created
    assert echo["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert echo["headers"]["X-Forwarded-Proto"] == "http"
    assert re.fullmatch(r"[0-9a-f]{32}", echo["headers"]["X-Request-ID"])
    assert echo["response_headers"]["X-Request-ID"] == echo["headers"]["X-Request-ID"]
    assert TRACEPARENT.fullmatch(echo["headers"]["traceparent"])


@pytest.mark.parametrize("bad_id", ["has spaces in it", "x" * 500, "semi;colon", "a\tb"])
async def test_an_invalid_request_id_is_replaced(
    bad_id: str, start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    echo = await _echo(http, proxy, headers={"X-Request-ID": bad_id})
    ours = echo["headers"]["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", ours)
    assert echo["response_headers"]["X-Request-ID"] == ours
    assert [v for k, v in echo["header_items"] if k.lower() == "x-request-id"] == [ours]


@pytest.mark.parametrize("bad_tp", [
    "garbage", TP.upper(), "ff" + TP[2:], "00-" + "0" * 32 + TP[35:], TP[:-3] + "-0",
    TP + "-extra",
])
async def test_an_invalid_traceparent_is_replaced_by_a_valid_new_trace(
    bad_tp: str, start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    echo = await _echo(http, proxy, headers={"traceparent": bad_tp, "tracestate": "k=v"})
    ours = echo["headers"]["traceparent"]
    assert TRACEPARENT.fullmatch(ours)
    assert ours != bad_tp
    assert "0" * 32 not in ours
    assert "tracestate" not in _names(echo)  # it described a trace that was not continued


async def test_client_x_pinned_version_never_reaches_the_backend(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("p", "r", "v47")
    proxy = await start_proxy([pop])
    forged = {"X-Pinned-Version": "prompt=v1-forged"}
    echo = await _echo(http, proxy, headers=forged)
    assert "x-pinned-version" not in _names(echo)  # session-less: no pin at all
    echo = await _echo(http, proxy, headers=forged | {"X-Session-ID": "s1"})
    pinned = [v for k, v in echo["header_items"] if k.lower() == "x-pinned-version"]
    assert pinned == ["prompt=v47"]


FORGED = [
    ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "7.7.7.7"),
    ("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "https"),
    ("X-Real-IP", "6.6.6.6"), ("Forwarded", "for=6.6.6.6;host=evil.example;proto=https"),
]


def _forwarding_items(echo: dict[str, Any]) -> list[tuple[str, str]]:
    names = {"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip",
             "forwarded"}
    return sorted((k.lower(), v) for k, v in echo["header_items"] if k.lower() in names)


async def test_untrusted_forwarding_headers_are_replaced_by_the_socket_peer(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    # Also named in Connection (hop-by-hop): still never read, never passed on.
    for extra in ([], [("Connection", "X-Forwarded-For, X-Real-IP")]):
        echo = await _echo(http, proxy, headers=FORGED + extra)
        assert _forwarding_items(echo) == [
            ("x-forwarded-for", "127.0.0.1"), ("x-forwarded-proto", "http"),
            ("x-real-ip", "127.0.0.1")]


async def test_trusted_proxies_are_believed_as_far_as_they_vouch(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    # The test client connects from 127.0.0.1: here it plays the ingress in front.
    proxy = await start_proxy([pop], listen={"trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]})
    chain = [("X-Forwarded-For", "6.6.6.6, 198.51.100.1"), ("X-Forwarded-For", "10.1.2.3"),
             ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "api.example"),
             ("X-Real-IP", "6.6.6.6"), ("Forwarded", "for=6.6.6.6")]
    echo = await _echo(http, proxy, headers=chain)
    # 10.1.2.3 and the peer are trusted; 198.51.100.1 is the client; 6.6.6.6 is what
    # the client claimed before itself, and is dropped.
    assert _forwarding_items(echo) == [
        ("x-forwarded-for", "198.51.100.1, 10.1.2.3, 127.0.0.1"),
        ("x-forwarded-host", "api.example"), ("x-forwarded-proto", "https"),
        ("x-real-ip", "198.51.100.1")]
    # A chain named in Connection was for the hop that sent it: only the peer counts.
    echo = await _echo(http, proxy, headers=[*chain, ("Connection", "x-forwarded-for")])
    assert ("x-forwarded-for", "127.0.0.1") in _forwarding_items(echo)
    assert ("x-real-ip", "127.0.0.1") in _forwarding_items(echo)


async def test_trailer_announcements_are_not_forwarded(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    echo = await _echo(http, proxy, headers={"Trailer": "X-Checksum", "X-Kept": "1"})
    assert "trailer" not in _names(echo)
    assert echo["headers"]["X-Kept"] == "1"


# --- 5. the target decides nothing ------------------------------------------------------


@pytest.mark.parametrize("target", [
    "//{decoy}/x?y=1", "/x?y=1", "http://{proxy}/x?y=1", "HTTP://{proxy}/x?y=1",
])
async def test_origin_form_and_the_proxys_own_absolute_form_go_to_the_configured_backend(
    target: str, start_pop: StartPop, start_proxy: StartProxy, decoy: Decoy
) -> None:
    """A forged Host decides nothing; an absolute-form target naming the proxy itself
    is served as its path."""
    pop = await start_pop()
    proxy = await start_proxy([pop])
    where = f"127.0.0.1:{decoy.port}"
    ours = proxy.url.removeprefix("http://")
    line = target.format(decoy=where, proxy=ours)
    raw = await send_raw(int(proxy.url.rsplit(":", 1)[1]),
                     f"GET {line} HTTP/1.1\r\nHost: {where}\r\nConnection: close\r\n\r\n".encode())
    assert raw.startswith(b"HTTP/1.1 200"), raw
    echo_path = line.split(ours, 1)[-1]
    record = pop.requests[-1]
    assert (record.method, f"{record.path}?{record.query_string}") == ("GET", echo_path)
    assert record.headers["Host"] == pop.url.removeprefix("http://")
    assert b'"backend_id":"pop-1"' in raw
    assert decoy.connections == 0


@pytest.mark.parametrize("target", [
    "http://{decoy}/x?y=1", "http://evil.example/v1/x", "https://{proxy}/x",
    "http://{proxy_host}:1/x", "http://user:pw@{proxy}/x", "http://[::1]:{proxy_port}/x",
    "ftp://{proxy}/x",
])
async def test_an_absolute_form_target_naming_another_authority_gets_400(
    target: str, start_pop: StartPop, start_proxy: StartProxy, decoy: Decoy
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    ours = proxy.url.removeprefix("http://")
    line = target.format(decoy=f"127.0.0.1:{decoy.port}", proxy=ours,
                         proxy_host=ours.rsplit(":", 1)[0], proxy_port=ours.rsplit(":", 1)[1])
    raw = await send_raw(int(proxy.url.rsplit(":", 1)[1]),
                     f"GET {line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), raw
    assert json.loads(body)["error"]["code"] == "invalid_request_target"
    assert pop.requests == []
    assert decoy.connections == 0


# --- 6-8. redirects, encodings and statuses pass through untouched ----------------------


async def test_redirects_are_passed_to_the_client_not_followed(
    tiny: Tiny, decoy: Decoy, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    tiny.redirect_to = f"http://127.0.0.1:{decoy.port}/stolen?a=%2F"
    proxy = await _tiny_proxy(start_proxy, tiny)
    async with http.post(_url(proxy, "/redirect"), data=b"x", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == tiny.redirect_to
    assert decoy.connections == 0
    assert tiny.requests == [("POST", "/redirect")]


async def test_compressed_bodies_pass_without_decompression(
    tiny: Tiny, start_proxy: StartProxy
) -> None:
    proxy = await _tiny_proxy(start_proxy, tiny)
    async with aiohttp.ClientSession(auto_decompress=False) as raw_http, raw_http.get(
        _url(proxy, "/gzip"), headers={"Accept-Encoding": "gzip"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(GZIPPED))
        assert await resp.read() == GZIPPED


@pytest.mark.parametrize("code", [201, 404, 429, 500])
async def test_status_reason_and_body_pass_through(
    code: int, tiny: Tiny, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await _tiny_proxy(start_proxy, tiny)
    async with http.get(_url(proxy, f"/status/{code}")) as resp:
        assert (resp.status, resp.reason) == (code, f"Reason {code}")
        assert await resp.json() == {"error": {"message": f"backend says {code}",
                                               "type": "backend"}}
        assert resp.headers.get("Retry-After") == ("7" if code == 429 else None)


async def test_bodiless_statuses_keep_the_connection_usable(
    tiny: Tiny, start_proxy: StartProxy
) -> None:
    proxy = await _tiny_proxy(start_proxy, tiny)
    # One connection for everything: stray framing bytes after a 204/304 would break it.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one:
        for code in (204, 304, 204, 201):
            async with one.get(_url(proxy, f"/status/{code}")) as resp:
                assert resp.status == code
                assert (await resp.read() == b"") is (code != 201)
                assert (resp.headers.get("ETag") == '"e1"') is (code != 201)


# --- 9. a backend breaking mid-body -----------------------------------------------------


async def _read_into(http: aiohttp.ClientSession, url: URL, received: list[bytes]) -> None:
    async with http.get(url) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            received.append(chunk)


@pytest.mark.parametrize("path", ["/break/length", "/break/chunked"])
async def test_a_backend_breaking_mid_body_is_not_passed_off_as_complete(
    path: str, tiny: Tiny, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    events: list[RequestEvent] = []

    class Recorder:
        def observe(self, event: RequestEvent) -> None:
            events.append(event)

    proxy = await start_proxy([], backends=[{"id": "tiny", "region": "r1", "url": tiny.url}],
                              observers=[Recorder()])
    sent = b"a" * 200 + b"b" * 300
    for _ in range(2):
        received: list[bytes] = []
        with pytest.raises(aiohttp.ClientPayloadError):
            await _read_into(http, _url(proxy, path), received)
        # Some of what the backend sent (or all of it), never a completed response.
        assert sent.startswith(b"".join(received))
        # The proxy keeps working.
        async with http.get(_url(proxy, "/fine")) as resp:
            assert (resp.status, await resp.text()) == (200, "tiny ok")
    # Recorded as the status that was sent, with what cut the body: not as a 499.
    assert [(e.path, e.status, e.error_type) for e in events] == [
        (path, 200, "upstream_error"), ("/fine", 200, None)] * 2
