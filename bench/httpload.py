"""Load generation: a lean HTTP/1.1 client, closed- and open-loop drivers, and wrk.

Why not aiohttp's client: it costs several times what the proxy under test spends per
request, and on a two-core machine the generator shares a core with the POPs. The
client here sends pre-built request bytes on keep-alive connections and parses just
enough of the response (status, Content-Length or chunked framing) to know where it
ends. ``open_loop`` schedules requests at fixed intended times and measures latency
from those times, so a stall that delays sending is counted (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import shutil
import subprocess
import tempfile
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson

from bench.stats import summarize_ms

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
# An error answer's OpenAI-shaped body: its code, and pinproxy's shed reason if any.
_ERROR_CODE = re.compile(rb'"code":\s*"([^"]+)"')
_SHED_REASON = re.compile(rb'"reason":\s*"([^"]+)"')
_DRAIN_S = 5.0  # after the last scheduled request, how long stragglers may take
_TICK_S = 0.001
GENERATOR_LAG_LIMIT_S = 0.005

CHAT_BODY = orjson.dumps({"model": "sim", "messages": [{"role": "user", "content": "hello"}]})


def build_request(
    host: str,
    port: int,
    path: str,
    *,
    body: bytes = CHAT_BODY,
    session_id: str | None = None,
    method: str = "POST",
    extra: Sequence[tuple[str, str]] = (),
) -> bytes:
    """One HTTP/1.1 request as bytes, keep-alive, JSON body."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if session_id is not None:
        lines.append(f"X-Session-ID: {session_id}")
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def session_requests(
    host: str, port: int, path: str, sessions: int, prefix: str, *, turns: int = 1
) -> list[bytes]:
    """Requests cycling over ``sessions`` ids; ``turns`` consecutive requests per id."""
    out = []
    for i in range(sessions):
        req = build_request(host, port, path, session_id=f"{prefix}{i}")
        out.extend([req] * turns)
    return out


class HttpConn(asyncio.Protocol):
    """One keep-alive client connection with at most one request outstanding.

    ``on_done(conn, status, now)`` fires when a response is complete; ``on_body(conn,
    data, now)`` (optional) sees every body piece as it arrives (for SSE timing);
    ``on_lost(conn, exc)`` when the connection closes.
    """

    def __init__(
        self,
        on_done: Callable[[HttpConn, int, float], None],
        on_lost: Callable[[HttpConn, Exception | None], None],
        on_body: Callable[[HttpConn, bytes, float], None] | None = None,
    ) -> None:
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.sent_at = 0.0
        self.token: Any = None  # the caller's bookkeeping for the outstanding request
        self.closed = False
        self._on_done = on_done
        self._on_lost = on_lost
        self._on_body = on_body
        self._buf = bytearray()
        self._status = 0
        self._remaining = -1  # body bytes still expected; -1: reading the head
        self._chunked = False
        self._clock = time.perf_counter

    @property
    def status(self) -> int:
        """The status of the response being read (or the last one)."""
        return self._status

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast("asyncio.Transport", transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_lost(self, exc)

    def send(self, data: bytes, token: Any = None) -> None:
        assert self.transport is not None
        self.busy = True
        self.token = token
        self._remaining = -1
        self._chunked = False
        self.sent_at = self._clock()
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        now = self._clock()
        buf = self._buf
        buf += data
        while buf:
            if self._remaining < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[: end + 2])
                del buf[: end + 4]
                self._status = int(head[9:12])
                self._chunked = _CHUNKED.search(head) is not None
                match = _CONTENT_LENGTH.search(head)
                self._remaining = 0 if self._chunked else int(match.group(1)) if match else 0
                if not self._chunked and self._remaining == 0:
                    self._finish(now)
                    continue
            if self._chunked:
                if not self._chunk(now):
                    return
                continue
            take = min(self._remaining, len(buf))
            if self._on_body is not None and take:
                self._on_body(self, bytes(buf[:take]), now)
            del buf[:take]
            self._remaining -= take
            if self._remaining == 0:
                self._finish(now)
            else:
                return

    def _chunk(self, now: float) -> bool:
        """Consume chunked framing; True if progress was made and parsing may go on."""
        buf = self._buf
        if self._remaining > 0:  # inside a chunk's data (+2 for its CRLF)
            take = min(self._remaining, len(buf))
            data_part = min(take, max(self._remaining - 2, 0))
            if self._on_body is not None and data_part > 0:
                self._on_body(self, bytes(buf[:data_part]), now)
            del buf[:take]
            self._remaining -= take
            return self._remaining == 0
        line_end = buf.find(b"\r\n")
        if line_end < 0:
            return False
        size = int(bytes(buf[:line_end]).split(b";")[0], 16)
        if size == 0:
            if len(buf) < line_end + 4:  # the last chunk's CRLF and the empty trailer
                return False
            del buf[: line_end + 4]
            self._remaining = -1
            self._finish(now)
            return True
        del buf[: line_end + 2]
        self._remaining = size + 2
        return True

    def _finish(self, now: float) -> None:
        self._remaining = -1
        self.busy = False
        self._on_done(self, self._status, now)


@dataclass
class LoadResult:
    """What one load run measured; latencies are seconds."""

    generator: str
    mode: str  # "closed" or "open"
    duration_s: float
    offered_rps: float | None = None
    concurrency: int | None = None
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: array[float] = field(default_factory=lambda: array("d"))
    generator_cpu_s: float = 0.0
    # Open loop: how late the generator's ticks fired (seconds). Large values mean the
    # generator, not the target, could not keep the offered rate.
    tick_lateness: array[float] = field(default_factory=lambda: array("d"))
    summary_override: dict[str, float] | None = None  # wrk reports percentiles itself
    peak_connections: int = 0  # open loop: the most connections open at once

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.completed / self.duration_s if self.duration_s > 0 else 0.0

    def count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def summary(self) -> dict[str, Any]:
        lat = self.summary_override or summarize_ms(self.latencies)
        return {
            "generator": self.generator,
            "mode": self.mode,
            "offered_rps": None if self.offered_rps is None else round(self.offered_rps, 1),
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
            "completed": self.completed,
            "rps": round(self.rps, 1),
            "errors": self.error_count,
            "error_reasons": dict(self.errors),
            "latency": lat,
            "generator_cpu_s": round(self.generator_cpu_s, 3),
            "peak_connections": self.peak_connections,
        } | self._lateness()

    def _lateness(self) -> dict[str, Any]:
        if not self.tick_lateness:
            return {}
        late = sorted(self.tick_lateness)
        p99 = late[min(len(late) - 1, int(0.99 * len(late)))]
        return {
            "tick_lateness_p99_ms": round(1000 * p99, 3),
            "tick_lateness_max_ms": round(1000 * late[-1], 3),
            # The generator fell behind its own schedule by more than 5 ms at the 99th
            # percentile: the latencies then say more about the generator than the target.
            "generator_limited": p99 > GENERATOR_LAG_LIMIT_S,
        }


async def _connect(
    host: str,
    port: int,
    on_done: Callable[[HttpConn, int, float], None],
    on_lost: Callable[[HttpConn, Exception | None], None],
    on_body: Callable[[HttpConn, bytes, float], None] | None = None,
) -> HttpConn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: HttpConn(on_done, on_lost, on_body), host, port)
    return proto


async def closed_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.0,
) -> LoadResult:
    """``concurrency`` connections, each sending its next request when the last returns."""
    loop = asyncio.get_running_loop()
    result = LoadResult("builtin", "closed", duration_s, concurrency=concurrency)
    clock = time.perf_counter
    start = clock()
    measure_from = start + warmup_s
    end = measure_from + duration_s
    done = loop.create_future()
    n = len(requests)
    state = {"next": 0, "active": concurrency}
    lat = result.latencies

    def retire() -> None:
        state["active"] -= 1
        if state["active"] == 0 and not done.done():
            done.set_result(None)

    def send_next(conn: HttpConn, now: float) -> None:
        if now >= end or conn.closed:
            retire()
            return
        i = state["next"]
        state["next"] = i + 1
        conn.send(requests[i % n])

    def on_done(conn: HttpConn, status: int, now: float) -> None:
        if conn.sent_at >= measure_from:
            if 200 <= status < 300:
                result.completed += 1
                lat.append(now - conn.sent_at)
            else:
                result.count_error(f"status_{status}")
        send_next(conn, now)

    def on_lost(conn: HttpConn, exc: Exception | None) -> None:
        if conn.busy:
            conn.busy = False
            result.count_error("connection_lost")
            retire()

    cpu0 = time.process_time()
    conns = await asyncio.gather(
        *(_connect(host, port, on_done, on_lost) for _ in range(concurrency))
    )
    try:
        for conn in conns:
            send_next(conn, clock())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, timeout=warmup_s + duration_s + _DRAIN_S)
    finally:
        for conn in conns:
            conn.close()
    result.generator_cpu_s = time.process_time() - cpu0
    return result


def error_kind(status: int, body: bytes) -> str:
    """``status_503_proxy_overloaded_queue_full``: an error answer by status, the code of
    its JSON body and pinproxy's shed reason, so sheds and store errors count apart."""
    kind = f"status_{status}"
    for pattern in (_ERROR_CODE, _SHED_REASON):
        match = pattern.search(body)
        if match:
            kind += "_" + match.group(1).decode("ascii", "replace")
    return kind


async def open_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    rate: float,
    duration_s: float,
    initial_conns: int = 32,
    max_conns: int = 2048,
) -> LoadResult:
    """Requests at a constant rate; latency counts from each request's intended time.

    When every connection is busy a new one is opened (up to ``max_conns``), as a
    population of independent users would; past that, requests wait in a queue and the
    wait counts in their latency.
    """
    loop = asyncio.get_running_loop()
    result = LoadResult("builtin", "open", duration_s, offered_rps=rate)
    clock = time.perf_counter
    lat = result.latencies
    n_req = len(requests)
    total = max(1, int(rate * duration_s))
    idle: deque[HttpConn] = deque()
    pending: deque[tuple[float, int]] = deque()  # (intended time, request index)
    state = {"sent": 0, "finished": 0, "conns": 0, "opening": 0, "ticks": 0}
    all_done = loop.create_future()
    conns: list[HttpConn] = []

    def check_done() -> None:
        if state["finished"] >= total and not all_done.done():
            all_done.set_result(None)

    def dispatch(conn: HttpConn) -> None:
        if pending and not conn.closed:
            intended, i = pending.popleft()
            conn.send(requests[i % n_req], intended)
        elif not conn.closed:
            idle.append(conn)

    error_bodies: dict[HttpConn, bytearray] = {}

    def on_body(conn: HttpConn, data: bytes, now: float) -> None:
        if not 200 <= conn.status < 300:
            error_bodies.setdefault(conn, bytearray()).extend(data[:1024])

    def on_done(conn: HttpConn, status: int, now: float) -> None:
        state["finished"] += 1
        if 200 <= status < 300:
            result.completed += 1
            lat.append(now - conn.token)
        else:
            result.count_error(error_kind(status, bytes(error_bodies.pop(conn, b""))))
        dispatch(conn)
        check_done()

    def on_lost(conn: HttpConn, exc: Exception | None) -> None:
        state["conns"] -= 1
        with contextlib.suppress(ValueError):
            idle.remove(conn)
        if conn.busy:
            conn.busy = False
            state["finished"] += 1
            result.count_error("connection_lost")
            check_done()

    openers: set[asyncio.Task[None]] = set()

    async def open_one(counted: bool = False) -> None:
        if not counted:
            state["opening"] += 1
        try:
            conn = await _connect(host, port, on_done, on_lost, on_body)
        except OSError:
            result.count_error("connect_failed")
            return
        finally:
            state["opening"] -= 1
        state["conns"] += 1
        result.peak_connections = max(result.peak_connections, state["conns"])
        conns.append(conn)
        dispatch(conn)

    cpu0 = time.process_time()
    await asyncio.gather(*(open_one() for _ in range(initial_conns)))
    # Arrivals come in ticks of at least _TICK_S: libuv timers have millisecond
    # resolution, and a shorter timer would spin the core the POPs share. Every request
    # of a tick is intended at the tick's due time, and latency counts from there, so
    # a tick that fires late (a busy generator) still shows up in the numbers.
    tick_s = max(1.0 / rate, _TICK_S)
    ticks = max(1, round(duration_s / tick_s))
    per_tick = total / ticks
    t0 = clock() + 0.01

    def tick() -> None:
        now = clock()
        k = state["ticks"]
        due = t0 + k * tick_s
        result.tick_lateness.append(max(0.0, now - due))
        intended = min(due, now)  # a timer may fire a hair early; never count from the future
        upto = total if k + 1 >= ticks else min(total, round((k + 1) * per_tick))
        for i in range(state["sent"], upto):
            if idle:
                idle.popleft().send(requests[i % n_req], intended)
            else:
                pending.append((intended, i))
                if state["conns"] + state["opening"] < max_conns:
                    # Counted now, not when the task runs, so one tick cannot overshoot.
                    state["opening"] += 1
                    opener = loop.create_task(open_one(counted=True))
                    openers.add(opener)
                    opener.add_done_callback(openers.discard)
        state["sent"] = upto
        state["ticks"] = k + 1
        if upto < total:
            loop.call_at(loop.time() + max(0.0, t0 + (k + 1) * tick_s - clock()), tick)

    loop.call_soon(tick)
    try:
        await asyncio.wait_for(all_done, timeout=duration_s + _DRAIN_S + 0.5)
    except TimeoutError:
        missing = total - state["finished"]
        result.errors["timeout"] = result.errors.get("timeout", 0) + missing
    finally:
        for conn in conns:
            conn.close()
    result.generator_cpu_s = time.process_time() - cpu0
    result.duration_s = duration_s
    return result


class SerialClient:
    """One connection used at concurrency 1: ``await client.request(bytes)`` -> (status, s)."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._conn: HttpConn | None = None
        self._fut: asyncio.Future[tuple[int, float]] | None = None

    async def open(self) -> None:
        self._conn = await _connect(self._host, self._port, self._done, self._lost)

    def _done(self, conn: HttpConn, status: int, now: float) -> None:
        if self._fut is not None and not self._fut.done():
            self._fut.set_result((status, now - conn.sent_at))

    def _lost(self, conn: HttpConn, exc: Exception | None) -> None:
        if self._fut is not None and not self._fut.done():
            self._fut.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    async def request(self, data: bytes, timeout_s: float = 10.0) -> tuple[int, float]:
        if self._conn is None or self._conn.closed:
            await self.open()
        assert self._conn is not None
        self._fut = asyncio.get_running_loop().create_future()
        self._conn.send(data)
        return await asyncio.wait_for(self._fut, timeout_s)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


# -- wrk --------------------------------------------------------------------------------

_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  wrk.headers["X-Session-ID"] = "{prefix}" .. (math.floor(n / {turns}) % {sessions})
  return wrk.format()
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d," ..
    "\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,\\"p50\\":%d,\\"p90\\":%d,\\"p99\\":%d," ..
    "\\"p999\\":%d,\\"max\\":%d,\\"mean\\":%f}}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


def find_wrk() -> str | None:
    return shutil.which("wrk")


def _lua_string(data: bytes) -> str:
    return '"' + data.decode().replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(
    url: str,
    *,
    concurrency: int,
    duration_s: float,
    sessions: int,
    prefix: str,
    turns: int = 8,
    cpus: str | None = None,
    taskset: str | None = None,
) -> LoadResult:
    """wrk (closed loop) with a Lua script that rotates session ids; percentiles from wrk."""
    binary = find_wrk()
    if binary is None:
        raise RuntimeError("wrk is not installed")
    script = _WRK_SCRIPT.format(
        body=_lua_string(CHAT_BODY), prefix=prefix, sessions=sessions, turns=turns
    )
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        path = Path(tmp) / "bench.lua"
        path.write_text(script)
        secs = max(1, math.ceil(duration_s))
        cmd = [
            binary,
            "-t1",
            f"-c{concurrency}",
            f"-d{secs}s",
            "--timeout",
            "10s",
            "-s",
            str(path),
            url,
        ]
        if cpus is not None and taskset is not None:
            cmd = [taskset, "-c", cpus, *cmd]
        before = _children_cpu()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30, check=False)
        cpu = _children_cpu() - before
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result (exit {out.returncode}):\n{out.stdout}{out.stderr}")
    data = orjson.loads(line.removeprefix("BENCHJSON "))
    duration = data["duration_us"] / 1e6
    errors = {k: int(data[k]) for k in ("connect", "read", "write", "status", "timeout") if data[k]}
    result = LoadResult(
        "wrk",
        "closed",
        duration,
        concurrency=concurrency,
        completed=int(data["requests"]),
        errors=errors,
        generator_cpu_s=cpu,
    )
    result.completed -= errors.get("status", 0)
    result.summary_override = {
        "count": result.completed,
        "mean_ms": round(data["mean"] / 1000, 4),
        "p50_ms": data["p50"] / 1000,
        "p90_ms": data["p90"] / 1000,
        "p99_ms": data["p99"] / 1000,
        "p999_ms": data["p999"] / 1000,
        "max_ms": data["max"] / 1000,
    }
    return result


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
