"""Microbenchmark: CPU per request of the upstream client, lean (httptools) vs aiohttp's.

``python -m bench.micro_upstream [--rounds R] [--requests N] [--concurrency C] [--no-pin]``

No proxy: this process is the client, a raw asyncio + httptools backend in a child process
answers (pinned to another core when there are two). Per scenario, the two clients run in
interleaved rounds (A B, then B A, ...) and each round's CPU time of this process
(``time.process_time``) is divided by what it moved:

- ``held``: a small POST (a 300-byte chat request, held in memory) answered by a small
  JSON completion, ``C`` requests in flight on keep-alive connections; µs per request.
- ``sse``: ``C`` concurrent SSE streams of 50 events, 5 ms apart, one event per write;
  µs per event relayed (read off the client with ``read_chunk`` / ``readany``).
- ``upload``: a streamed (unheld) 1 MiB request body in 64 KiB chunks, Content-Length
  declared, answered by a small JSON; µs per request and per MiB.

The aiohttp side is configured as pinproxy configured it (``auto_decompress=False``,
no cookie jar, no auto headers, connect and sock_read timeouts). The table shows the
median over rounds and [min, max]; compare only numbers from one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import aiohttp
import httptools

from proxy.config.settings import UpstreamConfig
from proxy.upstream.framing import Target
from proxy.upstream.pool import Http1Pool

_REQUEST: Final = (
    b'{"model": "m", "session_id": "s-123456", "messages": [{"role": "user", "content": "'
    + b"x" * 200 + b'"}]}'
)
_ANSWER: Final = (
    b'{"id": "c-1", "object": "chat.completion", "choices": [{"index": 0, "message": '
    b'{"role": "assistant", "content": "' + b"y" * 300 + b'"}}], "usage": '
    b'{"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}'
)
_EVENTS: Final = 50
_GAP_S: Final = 0.005
_UPLOAD: Final = 1024 * 1024
_UPLOAD_CHUNK: Final = 64 * 1024

# --- the backend (child process) -------------------------------------------------------------


class _Serve(asyncio.Protocol):
    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.close()

    def on_url(self, url: bytes) -> None:
        self._url = url

    def on_message_complete(self) -> None:
        assert self._transport is not None
        if self._url.startswith(b"/sse"):
            asyncio.get_running_loop().create_task(self._stream(self._transport))
            return
        self._transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(_ANSWER)).encode() + b"\r\n\r\n" + _ANSWER
        )

    async def _stream(self, transport: asyncio.Transport) -> None:
        transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        event = b'data: {"choices": [{"delta": {"content": "tok"}}]}\n\n'
        frame = b"%x\r\n%s\r\n" % (len(event), event)
        for _ in range(_EVENTS):
            await asyncio.sleep(_GAP_S)
            if transport.is_closing():
                return
            transport.write(frame)
        transport.write(b"0\r\n\r\n")


async def _serve_main() -> None:
    server = await asyncio.get_running_loop().create_server(_Serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    await asyncio.Event().wait()


# --- the two clients, as pinproxy drives them ------------------------------------------------

Send = Callable[[str, str, bytes | AsyncIterator[bytes], dict[str, str]], Awaitable[int]]


def _lean(pool: Http1Pool, base: str) -> Send:
    target = Target(base)

    async def send(
        method: str, path: str, body: bytes | AsyncIterator[bytes], headers: dict[str, str]
    ) -> int:
        response = await pool.request(target, method, path, headers, body)  # type: ignore[arg-type]
        chunks = 0
        if response.whole_body() is None:
            while await response.read_chunk():
                chunks += 1
        else:
            chunks = 1
        response.release()
        return chunks

    return send


def _aiohttp(session: aiohttp.ClientSession, base: str) -> Send:
    async def send(
        method: str, path: str, body: bytes | AsyncIterator[bytes], headers: dict[str, str]
    ) -> int:
        response = await session.request(
            method, base + path, headers=headers, data=body, allow_redirects=False
        )
        chunks = 0
        while await response.content.readany():
            chunks += 1
        response.release()
        return chunks

    return send


def aiohttp_session(config: UpstreamConfig) -> aiohttp.ClientSession:
    """aiohttp's client as pinproxy configured it for streamed bodies and HEAD."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=config.pool_size, ttl_dns_cache=10),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout_s, sock_read=config.read_idle_timeout_s
        ),
        trust_env=False,
    )


async def _upload_body() -> AsyncIterator[bytes]:
    chunk = b"z" * _UPLOAD_CHUNK
    for _ in range(_UPLOAD // _UPLOAD_CHUNK):
        yield chunk


async def _run(send: Send, scenario: str, requests: int, concurrency: int) -> tuple[float, int]:
    """CPU seconds of this process and the units moved (requests or events)."""
    left = requests
    units = 0

    async def worker() -> None:
        nonlocal left, units
        while left > 0:
            left -= 1
            if scenario == "held":
                await send("POST", "/held", _REQUEST, {"Content-Type": "application/json"})
                units += 1
            elif scenario == "sse":
                events = await send("GET", "/sse", b"", {})
                units += events  # not `units += await ...`: that reads units before it waits
            else:
                await send("POST", "/upload", _upload_body(),
                           {"Content-Length": str(_UPLOAD)})
                units += 1

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - started, units


async def _bench(args: argparse.Namespace, port: int) -> dict[str, dict[str, list[float]]]:
    base = f"http://127.0.0.1:{port}"
    config = UpstreamConfig()
    pool = Http1Pool(config)
    session = aiohttp_session(config)
    clients: dict[str, Send] = {"lean": _lean(pool, base), "aiohttp": _aiohttp(session, base)}
    clients_for = {"upload": ["aiohttp"]} if args.skip_lean_upload else {}
    plan = {
        "held": (args.requests, args.concurrency),
        "sse": (max(args.requests // 100, 2 * args.concurrency), args.concurrency),
        "upload": (max(args.requests // 20, 20), 4),
    }
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for scenario, (count, concurrency) in plan.items():
            names = clients_for.get(scenario, list(clients))
            for name in names:  # warm-up: connections, code paths
                await _run(clients[name], scenario, concurrency * 4, concurrency)
            per = results.setdefault(scenario, {name: [] for name in names})
            for round_ in range(args.rounds):
                order = names if round_ % 2 == 0 else names[::-1]
                for name in order:
                    cpu, units = await _run(clients[name], scenario, count, concurrency)
                    per[name].append(cpu / units * 1e6)
    finally:
        await session.close()
        await pool.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_upstream")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--skip-lean-upload", action="store_true",
                        help="for a client that cannot stream request bodies")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import uvloop

    if args.serve:
        uvloop.run(_serve_main())
        return
    cores = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cores) >= 2
    child = subprocess.Popen(
        [*(["taskset", "-c", str(cores[0])] if pin else []), sys.executable, "-m",
         "bench.micro_upstream", "--serve"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        if pin:
            os.sched_setaffinity(0, {cores[-1]})
        results = uvloop.run(_bench(args, port))
    finally:
        child.terminate()
        child.wait(timeout=10)
    print(f"Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, "
          f"httptools {httptools.__version__}, uvloop {uvloop.__version__}; "
          f"{args.rounds} interleaved rounds, pinned={pin}")
    print(f"{'scenario':8} {'client':8} {'µs/unit median':>15}  [min, max]")
    for scenario, per in results.items():
        unit = "event" if scenario == "sse" else "request"
        for name, values in per.items():
            print(f"{scenario:8} {name:8} {statistics.median(values):15.1f}  "
                  f"[{min(values):.1f}, {max(values):.1f}]  per {unit}")


if __name__ == "__main__":
    main()
