"""Microbenchmark: pinproxy's own per-request cost in the audit trail and the request log.

``python -m bench.micro_observers [--events N] [--rounds R] [--no-redis]``

No HTTP, no proxy process: the observers are fed ready-made ``RequestEvent`` s, as the
data plane hands them over, and each stage is timed on its own, in µs per event:

- audit observe: ``AuditObserver.observe`` into a ``RedisAudit`` queue (the record's
  fields taken, queued; what runs inline on the request path).
- audit record JSON: the keys and records argument of a batch write's script calls
  (``RedisAudit.script_call``), no Redis.
- audit batch write: ``RedisAudit.flush`` of the queued records into a private
  ``redis-server`` on a free port (never 6379); wall time, and this process's CPU time
  (the client's share: command building, packing, reply parsing). Also redis-server's
  CPU time per record (``/proc``, all of it: protocol, commands, scripts), which is
  spent on Redis's core, not the proxy's, and the longest command call's mean time
  (``INFO commandstats``): how long one call holds Redis for everyone else.
- request log observe: ``RequestLog.observe`` (the inline part).
- request log JSON / text: ``RequestLog.flush`` of queued events into the line sink
  ``configure_logging`` makes, writing to /dev/null.

Each stage runs ``rounds`` times over ``events`` events; the table shows the median and
the best round. The machine may be shared: compare runs from the same sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

from proxy.config.observability import AuditConfig
from proxy.config.settings import StoreConfig
from proxy.core.events import RequestEvent, Usage
from proxy.telemetry.audit import AuditObserver, entry_json
from proxy.telemetry.audit_redis import _RECORDS_PER_CALL, RedisAudit
from proxy.telemetry.logs import JsonFormatter, TextFormatter
from proxy.telemetry.requestlog import LineSink, RequestLog, SessionHasher

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

_FORBIDDEN_PORT = 6379  # the machine's own Redis: never touched


def make_events(count: int, sessions: int = 1000) -> list[RequestEvent]:
    """Events like the bench's traffic: most with a session, some streamed, with usage."""
    events = []
    for i in range(count):
        streamed = i % 3 == 0
        events.append(RequestEvent(
            at=1_764_000_000.0 + i * 0.00025,
            request_id=f"{i:032x}",
            trace_id=f"{i * 7919:032x}",
            session_id=None if i % 10 == 9 else f"session-{i % sessions}",
            method="POST",
            path="/v1/chat/completions",
            status=200 if i % 50 else 503,
            backend_id="us-east-1" if i % 50 else None,
            region="us-east",
            version_key="prompt=v47,parser=json-v2",
            new_pin=i % 8 == 0,
            version_changed=None if i % 97 else "prompt=v46 -> prompt=v47",
            duration_s=0.0123456 + i * 1e-7,
            ttfb_s=0.0023456 if i % 50 else None,
            error_type=None if i % 50 else "service_unavailable",
            streamed=streamed,
            usage=Usage(prompt_tokens=12, completion_tokens=8) if i % 4 else None,
            structured_output_valid=None if i % 5 else True,
        ))
    return events


def _per_event_us(seconds: Sequence[float], count: int) -> tuple[float, float]:
    """(median, best) µs per event over the rounds."""
    ordered = sorted(seconds)
    return ordered[len(ordered) // 2] / count * 1e6, ordered[0] / count * 1e6


def _timed(rounds: int, setup: Callable[[], None], run: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(rounds):
        setup()
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


# -- audit -------------------------------------------------------------------------------


def bench_audit_observe(events: list[RequestEvent], rounds: int) -> list[float]:
    audit = RedisAudit(AuditConfig(queue_size=10_000_000), StoreConfig(kind="redis"),
                       client=None)  # type: ignore[arg-type]  # offer never touches it
    observer = AuditObserver(audit)
    observe = observer.observe

    def run() -> None:
        for event in events:
            observe(event)

    return _timed(rounds, audit._queue.clear, run)


def bench_audit_json(events: list[RequestEvent], rounds: int) -> list[float]:
    audit = RedisAudit(AuditConfig(queue_size=10_000_000), StoreConfig(kind="redis"),
                       client=None)  # type: ignore[arg-type]
    observer = AuditObserver(audit)
    for event in events:
        observer.observe(event)
    queued = list(audit._queue)
    # What the writer makes per script call (keys, records argument), as a batch write
    # makes them; trees before RedisAudit.script_call made a bytes object per record.
    script_call = getattr(audit, "script_call", None)
    size = _RECORDS_PER_CALL if script_call is not None else AuditConfig().batch_size
    key = audit.key

    def run() -> None:
        for start in range(0, len(queued), size):
            chunk = queued[start:start + size]
            if script_call is not None:
                made = script_call(chunk)
            else:
                made = [(key(session_id), entry_json(entry)) for session_id, entry in chunk]
            del made

    return _timed(rounds, lambda: None, run)


@contextlib.contextmanager
def private_redis() -> Iterator[tuple[str, int] | None]:
    """(URL, pid) of a throwaway redis-server on a free loopback port, or None."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = _FORBIDDEN_PORT
    while port == _FORBIDDEN_PORT:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="micro-redis-") as tmp:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp, "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0", proc.pid
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _audit_write(
    url: str, pid: int, events: list[RequestEvent], rounds: int
) -> dict[str, Any]:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    store = StoreConfig(kind="redis", url=url, key_prefix="micro:", op_timeout_ms=10_000)
    audit = RedisAudit(AuditConfig(queue_size=10_000_000), store, client)
    observer = AuditObserver(audit)
    walls, cpus, records, server_cpu = [], [], 0, 0.0
    try:
        await client.ping()
        for round_ in range(rounds + 1):  # the first round warms the connection
            if round_ == 1:
                await client.config_resetstat()
                server_cpu = _cpu_s(pid)
            for event in events:
                observer.observe(event)
            records = audit.queued
            wall, cpu = time.perf_counter(), time.process_time()
            await audit.flush()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        server_cpu = _cpu_s(pid) - server_cpu
        assert audit.write_failures == 0, "audit writes failed"
        stats = await client.info("commandstats")
    finally:
        await client.flushdb()
        await client.aclose()
    audit_calls = [(name, s) for name, s in stats.items()
                   if name in ("cmdstat_xadd", "cmdstat_pexpire", "cmdstat_eval")]
    longest = max(audit_calls, key=lambda item: item[1]["usec_per_call"])
    return {
        "records": records, "wall": walls[1:], "cpu": cpus[1:],
        "server_us_per_record": server_cpu / (records * rounds) * 1e6,
        "longest_call": (longest[0].removeprefix("cmdstat_"), longest[1]["usec_per_call"]),
    }


# -- request log -------------------------------------------------------------------------


def bench_log_observe(events: list[RequestEvent], rounds: int) -> list[float]:
    request_log = RequestLog(SessionHasher(b"key"), max_pending=10_000_000)
    observe = request_log.observe

    def run() -> None:
        for event in events:
            observe(event)

    return _timed(rounds, request_log._pending.clear, run)


def bench_log_lines(
    events: list[RequestEvent], rounds: int, formatter: JsonFormatter | TextFormatter
) -> list[float]:
    with open(os.devnull, "w") as devnull:
        # The sink configure_logging makes, writing to /dev/null.
        request_log = RequestLog(SessionHasher(b"key"), max_pending=10_000_000,
                                 sink=LineSink(devnull, formatter))

        def fill() -> None:
            for event in events:
                request_log.observe(event)

        return _timed(rounds, fill, request_log.flush)


# -- report ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_observers",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-redis", action="store_true", help="skip the batch write")
    args = parser.parse_args(argv)
    events = make_events(args.events)
    with_session = sum(e.session_id is not None for e in events)
    rows: list[tuple[str, float, float, str]] = []

    def add(name: str, seconds: list[float], count: int, note: str = "") -> None:
        median, best = _per_event_us(seconds, count)
        rows.append((name, median, best, note))

    add("audit: observe (record + queue)", bench_audit_observe(events, args.rounds),
        len(events), "per event (10% have no session)")
    add("audit: record JSON + key", bench_audit_json(events, args.rounds), with_session,
        "per record")
    if not args.no_redis:
        with private_redis() as server:
            if server is None:
                print("redis-server not on PATH: batch write skipped", file=sys.stderr)
            else:
                result = asyncio.run(_audit_write(*server, events, args.rounds))
                add("audit: batch write, wall", result["wall"], result["records"],
                    "per record, loopback redis-server")
                add("audit: batch write, client CPU", result["cpu"], result["records"],
                    "per record, this process only")
                name, call_us = result["longest_call"]
                server_us = result["server_us_per_record"]
                rows.append(("audit: batch write, Redis CPU", server_us, server_us,
                             f"per record, all rounds; longest call: {name} {call_us:.0f} µs"))
    add("request log: observe", bench_log_observe(events, args.rounds), len(events))
    add("request log: flush, JSON", bench_log_lines(events, args.rounds, JsonFormatter(0)),
        len(events), "per line, to /dev/null")
    add("request log: flush, text", bench_log_lines(events, args.rounds, TextFormatter(0)),
        len(events), "per line, to /dev/null")

    print(f"{args.events} events x {args.rounds} rounds, Python {sys.version.split()[0]}")
    print(f"{'stage':<34} {'median µs':>10} {'best µs':>9}  note")
    for name, median, best, note in rows:
        print(f"{name:<34} {median:>10.2f} {best:>9.2f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
