"""The Python floor: the least a uvloop + httptools proxy can do per request, as a target.

``python -m bench.floor_proxy --port N --upstream http://127.0.0.1:M``

What ``python -m bench throughput --targets python-floor`` measures: how much of
pinproxy's CPU per request is the language and its event loop, and how much is
pinproxy's own work. It is what pinproxy's data port would be with every feature taken
out: the same event loop (uvloop), the same HTTP/1.1 parser (httptools, llhttp) on
both sides, one keep-alive upstream connection per client connection, and per request
exactly one look at ``X-Session-ID`` (hashed, as a consistent-hash router would, to
pick among ``--upstream`` URLs). The request's bytes go upstream as they came, the
answer's bytes come back as they came: no header rewriting, no pins, no metrics, no
logs, no limits, no error answers beyond closing the connection. So it is not a proxy
anyone should run; it is the bar below which no Python proxy on this machine can go,
measured in the same run as pinproxy and the compiled baselines (bench/RESULTS.md).

Only what the bench sends is supported: requests with Content-Length or no body
(no chunked request bodies), answers framed by Content-Length or chunked.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import zlib
from urllib.parse import urlsplit

import httptools
import uvloop

_SESSION = b"x-session-id"


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to a backend, relaying each answer's bytes to the client."""

    def __init__(self, client: _Client) -> None:
        self._client = client
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        client = self._client.transport
        if client is not None:
            client.write(data)  # the answer's bytes as they came
        self._parser.feed_data(data)

    def on_message_complete(self) -> None:
        self._client.answered()

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.upstream_lost()


class _Client(asyncio.Protocol):
    """One client connection: parse each request far enough to route it, relay its bytes."""

    def __init__(self, upstreams: list[tuple[str, int]]) -> None:
        self._upstreams = upstreams
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._upstream: _Upstream | None = None
        self._pending: list[bytes] = []  # bytes of the request being read
        self._queued: list[bytes] = []  # whole requests waiting for the one in flight
        self._busy = False
        self._session = b""
        self._header = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._pending.append(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == _SESSION:
            self._session = value

    def on_message_complete(self) -> None:
        request = b"".join(self._pending)
        self._pending = []
        if self._busy:
            self._queued.append(request)
            return
        self._send(request)

    def _send(self, request: bytes) -> None:
        self._busy = True
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.write(request)
            return
        # The first request picks the backend by the session's hash, as consistent
        # hashing would; a one-backend bench always picks the same.
        host, port = self._upstreams[zlib.crc32(self._session) % len(self._upstreams)]
        self._upstream = _Upstream(self)
        asyncio.get_running_loop().create_task(self._connect(host, port, request))

    async def _connect(self, host: str, port: int, request: bytes) -> None:
        upstream = self._upstream
        assert upstream is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: upstream, host, port)
        except OSError:
            self.close()
            return
        assert upstream.transport is not None
        upstream.transport.write(request)

    def answered(self) -> None:
        self._busy = False
        if self._queued:
            self._send(self._queued.pop(0))

    def upstream_lost(self) -> None:
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None and upstream.transport is not None:
            upstream.transport.close()


async def _serve(host: str, port: int, upstreams: list[tuple[str, int]]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstreams), host, port, backlog=2048)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", action="append", required=True,
                        help="http://host:port of a backend; repeatable")
    args = parser.parse_args(argv)
    upstreams = []
    for url in args.upstream:
        parts = urlsplit(url)
        upstreams.append((parts.hostname or "127.0.0.1", parts.port or 80))
    # pinproxy's own GC settings ([runtime]), so the two differ only in the work done.
    gc.collect()
    gc.freeze()
    gc.set_threshold(2000, 10, 1000)
    uvloop.run(_serve(args.host, args.port, upstreams))


if __name__ == "__main__":
    main()
