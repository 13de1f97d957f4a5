"""https backends: certificates verified, connections kept alive, a private CA by config.

A throwaway CA (trustme) signs the backend's certificate; the pool is told to trust it
the way an operator's trust store would, or pinproxy is given it as upstream.ca_file.
Real TLS over loopback sockets.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
import pytest_asyncio
import trustme
from aiohttp import web

from proxy.config.settings import UpstreamConfig
from proxy.core.errors import UpstreamConnectError
from proxy.upstream.framing import Target
from proxy.upstream.pool import Http1Pool
from tests.fixtures.proxy import StartProxy

StartTls = Callable[..., Awaitable[int]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest_asyncio.fixture
async def start_tls() -> AsyncIterator[StartTls]:
    """An https backend on 127.0.0.1 that answers with what it saw and from which port."""
    runners: list[web.AppRunner] = []

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/version":  # what pinproxy's discovery polls
            return web.json_response({"prompt": "v1"})
        peer = request.transport.get_extra_info("peername") if request.transport else None
        body = await request.read()
        return web.json_response({"host": request.host, "peer_port": peer[1] if peer else None,
                                  "body": body.decode()})

    async def start(cert: trustme.LeafCert, client_ca: trustme.CA | None = None) -> int:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        if client_ca is not None:  # mutual TLS: only clients with a certificate it signed
            client_ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        runners.append(runner)
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


def trusting(ca: trustme.CA | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca is not None:
        ca.configure_trust(context)
    return context


async def fetch_json(pool: Http1Pool, target: Target) -> dict[str, object]:
    resp = await pool.request(target, "POST", "/v1/chat/completions", {}, b"hello")
    parts = []
    while chunk := await resp.read_chunk():
        parts.append(chunk)
    resp.release()
    assert resp.status == 200
    answer: dict[str, object] = orjson.loads(b"".join(parts))
    return answer


async def test_a_verified_https_backend_answers_and_keeps_its_connection(
    ca: trustme.CA, start_tls: StartTls
) -> None:
    port = await start_tls(ca.issue_cert("localhost", "127.0.0.1"))
    pool = Http1Pool(UpstreamConfig(connect_timeout_s=5, reuse_quiet_ms=0), tls=trusting(ca))
    try:
        # By name: the certificate is checked against "localhost", whichever of its
        # addresses answers (the backend listens on 127.0.0.1 only).
        target = Target(f"https://localhost:{port}")
        first = await fetch_json(pool, target)
        second = await fetch_json(pool, target)
    finally:
        await pool.close()
    assert first["host"] == f"localhost:{port}"
    assert first["body"] == "hello"
    assert first["peer_port"] == second["peer_port"]  # one TLS connection, reused


async def test_a_streamed_body_and_a_head_go_over_one_verified_tls_connection(
    ca: trustme.CA, start_tls: StartTls
) -> None:
    port = await start_tls(ca.issue_cert("localhost", "127.0.0.1"))
    pool = Http1Pool(UpstreamConfig(connect_timeout_s=5, reuse_quiet_ms=0), tls=trusting(ca))
    piece = b"s" * 100_000  # past the TLS transport's write buffer: flow control engages

    async def body() -> AsyncIterator[bytes]:
        for _ in range(8):  # under the backend's 1 MiB body limit
            yield piece

    try:
        target = Target(f"https://localhost:{port}")
        resp = await pool.request(target, "POST", "/upload", {}, body())  # chunked
        parts = []
        while chunk := await resp.read_chunk():
            parts.append(chunk)
        resp.release()
        head = await pool.request(target, "HEAD", "/upload", {}, b"")
        assert await head.read_chunk() == b""
        head.release()
        after = await fetch_json(pool, target)
    finally:
        await pool.close()
    assert resp.status == 200, b"".join(parts)
    streamed = orjson.loads(b"".join(parts))
    assert streamed["body"] == (piece * 8).decode()
    assert head.status == 200
    assert streamed["peer_port"] == after["peer_port"]  # all three on one connection


async def test_an_untrusted_certificate_is_refused(
    ca: trustme.CA, start_tls: StartTls
) -> None:
    port = await start_tls(ca.issue_cert("localhost", "127.0.0.1"))
    pool = Http1Pool(UpstreamConfig(connect_timeout_s=5), tls=trusting(None))
    try:
        with pytest.raises(UpstreamConnectError, match="connection to the backend failed"):
            await pool.request(Target(f"https://127.0.0.1:{port}"), "GET", "/", {}, b"")
    finally:
        await pool.close()


async def test_a_certificate_for_another_name_is_refused(
    ca: trustme.CA, start_tls: StartTls
) -> None:
    port = await start_tls(ca.issue_cert("pop.other.example"))
    pool = Http1Pool(UpstreamConfig(connect_timeout_s=5, reuse_quiet_ms=0), tls=trusting(ca))
    try:
        with pytest.raises(UpstreamConnectError):
            await pool.request(Target(f"https://127.0.0.1:{port}"), "GET", "/", {}, b"")
    finally:
        await pool.close()


async def test_a_backend_signed_by_a_private_ca_is_served_with_upstream_ca_file(
    ca: trustme.CA, start_tls: StartTls, start_proxy: StartProxy, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    port = await start_tls(ca.issue_cert("localhost", "127.0.0.1"))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    backend = {"id": "tls-1", "region": "r1", "url": f"https://localhost:{port}"}
    proxy = await start_proxy([], backends=[backend], upstream={"ca_file": str(ca_file)},
                              discovery={"interval_s": 0.1})
    async with http.post(f"{proxy.url}/v1/chat/completions", data=b"over tls",
                         headers={"X-Session-ID": "s1"}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Served-By"] == "tls-1"
        assert resp.headers["X-Prompt-Version"] == "v1"  # the /version poll worked over TLS
        assert (await resp.json())["body"] == "over tls"


async def test_without_the_private_ca_the_backend_is_never_trusted(
    ca: trustme.CA, start_tls: StartTls, start_proxy: StartProxy,
    http: aiohttp.ClientSession,
) -> None:
    port = await start_tls(ca.issue_cert("localhost", "127.0.0.1"))
    backend = {"id": "tls-1", "region": "r1", "url": f"https://localhost:{port}"}
    proxy = await start_proxy([], backends=[backend], discovery={"interval_s": 0.1},
                              routing={"pin_wait_ms": 300})
    async with http.post(f"{proxy.url}/v1/chat/completions", data=b"x") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["type"] == "no_backends"


async def test_a_backend_asking_for_a_client_certificate_gets_upstream_client_cert_file(
    ca: trustme.CA, start_tls: StartTls, start_proxy: StartProxy, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    port = await start_tls(ca.issue_cert("localhost"), client_ca=ca)
    ca_file, client = tmp_path / "ca.pem", tmp_path / "client.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("pinproxy.edge.example").private_key_and_cert_chain_pem.write_to_path(
        str(client))
    backend = {"id": "mtls-1", "region": "r1", "url": f"https://localhost:{port}"}
    with_cert = await start_proxy(
        [], backends=[backend], discovery={"interval_s": 0.1},
        upstream={"ca_file": str(ca_file), "client_cert_file": str(client)},
    )
    without = await start_proxy(
        [], backends=[backend], discovery={"interval_s": 0.1}, routing={"pin_wait_ms": 300},
        upstream={"ca_file": str(ca_file)},
    )
    async with http.post(f"{with_cert.url}/v1/chat/completions", data=b"mutual") as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["body"] == "mutual"
    async with http.post(f"{without.url}/v1/chat/completions", data=b"x") as resp:
        assert resp.status == 503  # the backend refused the handshake: never healthy
