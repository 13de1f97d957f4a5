"""Microbenchmark: the per-request work of the data plane outside the server and Redis.

``python -m bench.micro_request [--requests N] [--rounds R]``

No HTTP, no proxy process: each stage below is what ``DataPlane`` does once per proxied
request around the server and the pin store, fed the same small chat completion the
throughput bench's static POP answers, and timed on its own, in CPU µs per request
(``time.process_time``: a neighbour taking the core does not count; the machine's
caches are still shared):

- headers up / down: ``upstream_request_headers`` of a wrk-like request, and
  ``client_response_headers`` of an nginx-like answer.
- response tap: ``new_tap`` + ``feed`` + ``finish`` of the JSON answer (usage, model).
- event: ``Outcome.event``, the ``RequestEvent`` every observer is handed.
- observers: the observers the composition root builds with default settings and a
  Redis store, each fed the event (metrics, request log queue, traffic, soak, audit
  queue), without their background writers.
- request log line: ``RequestLog.flush`` into the JSON line sink, to /dev/null.

The API used is the one every tree since the layered restructure has, so a copy of
another tree can be measured against this one in the same sitting:
``PYTHONPATH=<tree> python -m bench.micro_request`` (the tree holding ``proxy/`` and
``bench/``), alternating the trees. bench/micro_observers.py measures the audit
trail's batch write to a real redis-server.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING

from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from proxy.config.observability import AuditConfig
from proxy.config.store import StoreConfig
from proxy.core.clock import SystemClock
from proxy.core.events import Outcome, RequestEvent, RequestObserver, Usage
from proxy.core.forwarded import TrustedProxies, forwarding
from proxy.core.headers import client_response_headers, upstream_request_headers
from proxy.telemetry.audit import AuditObserver
from proxy.telemetry.audit_redis import RedisAudit
from proxy.telemetry.logs import JsonFormatter
from proxy.telemetry.metrics import ProxyMetrics
from proxy.telemetry.requestlog import LineSink, RequestLog, SessionHasher
from proxy.telemetry.traffic import TrafficCounter
from proxy.telemetry.usage import TapLimits, new_tap

try:
    from proxy.fleet.rollout_soak import SoakCounter
except ImportError:  # a tree from before the soak's bookkeeping had its own module
    from proxy.fleet.rollout_control import SoakCounter  # type: ignore[attr-defined]
try:
    from proxy.telemetry.request_metrics import MetricsObserver
except ImportError:  # a tree from before metrics.py was split
    from proxy.telemetry.metrics import MetricsObserver  # type: ignore[attr-defined,no-redef]

if TYPE_CHECKING:
    from collections.abc import Callable

_TRACEPARENT = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"
_REQUEST = b'{"model":"m","messages":[{"role":"user","content":"hello"}],"user":"s-1"}'
# The static POP's answer in bench/throughput.py: a small chat completion with usage.
_ANSWER = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1764000000,'
    b'"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"' + b"pinned answer " * 8 + b'"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}'
)
_CLIENT_HEADERS = CIMultiDictProxy(CIMultiDict([
    ("Host", "127.0.0.1:8080"), ("Content-Type", "application/json"),
    ("Content-Length", str(len(_REQUEST))), ("X-Session-ID", "s-1"),
]))
_UPSTREAM_HEADERS = {
    "Server": "nginx/1.22.1", "Date": "Fri, 04 Dec 2026 18:00:00 GMT",
    "Content-Type": "application/json", "Content-Length": str(len(_ANSWER)),
    "Connection": "keep-alive", "X-Prompt-Version": "v47",
}


def _outcome(i: int) -> Outcome:
    return Outcome(
        session_id=f"session-{i % 1000}", status=200, backend_id="pop-1", region="bench",
        version_key="prompt=v47", new_pin=i % 3 == 0, ttfb_s=0.0021 + i * 1e-9,
        usage=Usage(12, 8), request_body=_REQUEST, client="127.0.0.1",
    )


def _soak_counter(clock: SystemClock) -> RequestObserver:
    try:
        return SoakCounter(clock)  # type: ignore[call-arg,unused-ignore]
    except TypeError:  # a tree whose SoakCounter took no clock
        return SoakCounter()  # type: ignore[call-arg,unused-ignore]


def _timed(rounds: int, count: int, run: Callable[[], object]) -> tuple[float, float]:
    """(median, best) CPU µs per request over the rounds."""
    return timed_rounds(rounds, count, lambda: run)


def timed_rounds(rounds: int, count: int, setup: Callable[[], Callable[[], object]]
                 ) -> tuple[float, float]:
    """(median, best) CPU µs per item over the rounds: each round times the callable
    that ``setup`` (not timed) returns for it."""
    times = []
    for _ in range(rounds):
        run = setup()
        started = time.process_time()
        run()
        times.append(time.process_time() - started)
    times.sort()
    return times[len(times) // 2] / count * 1e6, times[0] / count * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_request",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args(argv)
    n, rounds = args.requests, args.rounds
    outcomes = [_outcome(i) for i in range(n)]
    fwd = forwarding("127.0.0.1", "http", TrustedProxies(()), ())
    limits = TapLimits()
    rows: list[tuple[str, float, float]] = []

    def headers_up() -> None:
        for _ in range(n):
            upstream_request_headers(_CLIENT_HEADERS, forwarding=fwd, request_id="r" * 32,
                                     traceparent=_TRACEPARENT, pinned_version="prompt=v47")

    def headers_down() -> None:
        for _ in range(n):
            client_response_headers(_UPSTREAM_HEADERS)

    def tap() -> None:
        for _ in range(n):
            one = new_tap(200, "application/json", None, _REQUEST, limits)
            assert one is not None
            one.feed(_ANSWER)
            one.finish()

    def event_of(o: Outcome, i: int) -> RequestEvent:
        return o.event(at=1_764_000_000.0 + i, request_id=f"{i:032x}",
                       traceparent=_TRACEPARENT, incoming_traceparent=None, method="POST",
                       path="/v1/chat/completions", duration_s=0.004 + i * 1e-9)

    def events() -> None:
        for i, o in enumerate(outcomes):
            event_of(o, i)

    rows.append(("headers up", *_timed(rounds, n, headers_up)))
    rows.append(("headers down", *_timed(rounds, n, headers_down)))
    rows.append(("response tap (JSON)", *_timed(rounds, n, tap)))
    rows.append(("event (Outcome.event)", *_timed(rounds, n, events)))

    evs = [event_of(o, i) for i, o in enumerate(outcomes)]
    clock = SystemClock()
    metrics = ProxyMetrics(CollectorRegistry())
    request_log = RequestLog(SessionHasher(b"key"), max_pending=10 * n * rounds)
    audit = RedisAudit(AuditConfig(queue_size=10 * n * rounds), StoreConfig(kind="redis"),
                       client=None)  # type: ignore[arg-type]  # offer never touches it
    observers: list[tuple[str, RequestObserver]] = [
        ("metrics", MetricsObserver(metrics)),
        ("request log (queue)", request_log),
        ("traffic", TrafficCounter(clock)),
        ("traffic (evals)", TrafficCounter(clock, evals=True)),
        # The events predate the ledger's birth, so this row is its cumulative counts
        # only; bench/micro_soak.py times its time buckets too.
        ("soak", _soak_counter(clock)),
        ("audit (queue)", AuditObserver(audit)),
    ]
    total_best = total_median = 0.0
    for name, observer in observers:
        observe = observer.observe

        def run(observe: Callable[[RequestEvent], None] = observe) -> None:
            for event in evs:
                observe(event)

        median, best = _timed(rounds, n, run)
        total_median, total_best = total_median + median, total_best + best
        rows.append((f"observer: {name}", median, best))
    rows.append(("observers, together", total_median, total_best))
    with open(os.devnull, "w") as devnull:
        line_log = RequestLog(SessionHasher(b"key"), max_pending=10 * n,
                              sink=LineSink(devnull, JsonFormatter(0)))
        times = []
        for _ in range(rounds):
            for event in evs:
                line_log.observe(event)
            started = time.process_time()
            line_log.flush()
            times.append(time.process_time() - started)
        times.sort()
        rows.append(("request log line (JSON)", times[len(times) // 2] / n * 1e6,
                     times[0] / n * 1e6))
    print_stages(f"{n} requests x {rounds} rounds", rows)
    return 0


def print_stages(heading: str, rows: list[tuple[str, float, float]]) -> None:
    """The heading (with the Python version and load average), then a row per stage."""
    print(f"{heading}, Python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'stage':<28} {'median µs':>10} {'best µs':>9}")
    for name, median, best in rows:
        print(f"{name:<28} {median:>10.2f} {best:>9.2f}")


if __name__ == "__main__":
    sys.exit(main())
