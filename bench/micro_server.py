"""Microbenchmark: CPU per request of the data port's HTTP server alone.

``python -m bench.micro_server [--rounds R] [--duration S] [--concurrency C] [--no-pin]``

No proxying, no pin store: this process runs pinproxy's ``H1Server``
(proxy/dataplane/h1_server.py, its connections and exchanges) with a handler that
reads the body and answers a small JSON completion with ``respond``, the way the relay
answers a held response; ``wrk`` (required) drives it with a wrk-like chat POST on
``C`` keep-alive connections for ``S`` seconds per round. Per round: this process's
CPU time (``time.process_time``) divided by the requests wrk completed; the median
and [min, max] over rounds. With two or more cores the server is pinned to the last
and wrk to the others.

It isolates what the server costs per request (parsing, the exchange, timers, the
task that runs the handler, the answer's head) from the rest of the request path,
which a loaded machine's throughput runs cannot resolve. For before/after numbers, run
it against each tree in turn from a directory holding no ``proxy/`` package, with a
directory holding only that tree's ``proxy/`` (``git archive <rev> proxy``) first on
``PYTHONPATH`` (``cd /tmp && PYTHONPATH=<dir>:<this checkout> python -m
bench.micro_server``), alternating the trees.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from proxy.dataplane.edge_options import EdgeOptions
from proxy.dataplane.h1_server import H1Server
from proxy.telemetry.metrics import ProxyMetrics

if TYPE_CHECKING:
    from proxy.dataplane.exchange import Exchange

_ANSWER = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","model":"bench-model",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"pinned answer"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":8,'
    b'"total_tokens":20}}'
)
_SCRIPT = """wrk.method = "POST"
wrk.body = '{"model":"m","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Session-ID"] = "s-1"
"""


async def _answer(exchange: Exchange) -> None:
    while await exchange.read_chunk():
        pass
    await exchange.respond(200, [("Content-Type", "application/json")], _ANSWER)


def _options() -> EdgeOptions:
    return EdgeOptions(
        name="data", head_timeout_s=10.0, keepalive_timeout_s=620.0, max_connections=10_000,
        max_connections_per_ip=0, retry_after_s=1, max_head_bytes=64 * 1024,
        max_body_bytes=1024 * 1024, server_header="",
    )


async def _bench(args: argparse.Namespace, wrk: list[str]) -> list[float]:
    server = H1Server(_answer, options=_options(), metrics=ProxyMetrics(CollectorRegistry()))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    await server.listen("127.0.0.1", port, reuse_port=False, backlog=1024)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    per_request: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-micro-server-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_SCRIPT)
        for round_ in range(args.rounds + 1):  # the first round warms up, uncounted
            started = time.process_time()
            proc = await asyncio.create_subprocess_exec(
                *wrk, "-t1", f"-c{args.concurrency}", f"-d{args.duration}s", "-s",
                str(script), url, stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            cpu = time.process_time() - started
            done = next(line for line in out.decode().splitlines() if "requests in" in line)
            if round_:
                per_request.append(cpu / int(done.split()[0]) * 1e6)
    await server.shutdown(1.0)
    return per_request


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_server")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=3, help="seconds per round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(argv)
    import uvloop

    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    cores = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cores) >= 2 and shutil.which("taskset") is not None
    wrk = [binary]
    if pin:
        others = ",".join(str(c) for c in cores[:-1])
        wrk = ["taskset", "-c", others, binary]
        os.sched_setaffinity(0, {cores[-1]})
    results = uvloop.run(_bench(args, wrk))
    import proxy

    print(f"Python {sys.version.split()[0]}, proxy from {Path(proxy.__file__).parent}; "
          f"{args.rounds} rounds of {args.duration} s, {args.concurrency} connections, "
          f"pinned={pin}")
    print(f"server CPU µs/request: median {statistics.median(results):.2f} "
          f"[{min(results):.2f}, {max(results):.2f}]  rounds: "
          + ", ".join(f"{r:.2f}" for r in results))


if __name__ == "__main__":
    main()
