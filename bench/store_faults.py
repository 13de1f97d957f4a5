"""Scenario ``store-faults``: steady pinned traffic through two replicas while Redis fails.

Two pinproxy replicas share one private ``redis-server``; each replica pins new
sessions to its own version (v1 or v2), so a session pinned afresh by the other
replica would certainly change version. Every session is first pinned through one
replica, then continues its conversation (an ``assistant`` turn in the body) with a
request every ``--interval`` seconds, alternating replicas. The fault sequence:

- ``steady``: nothing wrong (Redis commands per request measured here, cached pins);
- ``new-sessions``: a burst of first turns (commands per request for cache misses);
- ``pause``: SIGSTOP for ``--pause`` seconds (longer than the subscription timeout);
- ``kill``: SIGKILL, down for ``--outage`` seconds, restarted empty;
- ``flushall``: every key dropped under traffic;
- ``failover`` (``--sentinel``): the same traffic against a primary, a replica and three
  sentinels; the primary is killed and the replica promoted.

Reported per phase: answers per version per session (sessions answered by two
versions; answers on another version without ``X-Prompt-Version-Changed``: silent
re-pins), status counts with error types, latency p50/p99/max, and recovery time:
from the store's return until every session was answered 200 again.
``BENCH_PROXY_SRC`` runs another copy of pinproxy (before/after numbers).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import redis

from bench.common import RunContext, run_async, run_context, wait_ready
from bench.procs import (
    BenchError,
    PopSpec,
    free_port,
    parse_overrides,
    proxy_toml,
    start_pinproxy,
    start_sim_pop,
)
from bench.report import md_header, verdict, write_json
from bench.stats import counts_line, summarize_ms, table

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from bench.procs import Proc, Procs

FIRST = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}
LATER = {"model": "sim", "messages": [
    {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "and then?"},
]}  # fmt: skip
MASTER = "benchmaster"


@dataclass(frozen=True, slots=True)
class StoreFaultsConfig:
    sessions: int = 40
    interval_s: float = 0.05
    phase_s: float = 3.0  # traffic after each fault (recovery window)
    pause_s: float = 7.0
    outage_s: float = 1.0
    new_sessions: int = 200
    sentinel: bool = True
    proxy_set: tuple[str, ...] = ()
    pin: bool = True
    out_root: Path | None = None


@dataclass
class Answer:
    at: float
    session: str
    status: int
    version: str | None
    changed: str | None
    error: str | None
    latency_s: float


@dataclass
class Phase:
    name: str
    started: float
    store_back: float | None = None
    ended: float = 0.0
    commands: dict[str, int] = field(default_factory=dict)
    requests: int = 0


class Redis1:
    """The standalone server: one process that the phases pause, kill and restart."""

    def __init__(self, procs: Procs, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("redis-server not found on PATH (apt-get install redis-server)")
        self.port = free_port()
        self._procs = procs
        self._cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"]
        self.proc: Proc = procs.start("redis", self._cmd, port=self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.proc.stop(signal.SIGKILL)

    def start(self) -> None:
        self.proc = self._procs.start("redis", self._cmd, port=self.port)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2.0)


def commandstats(port: int) -> dict[str, int]:
    with redis.Redis(port=port, socket_timeout=2.0) as client:
        stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()
            if name not in ("cmdstat_info",)}


class Traffic:
    """Closed loops, one per session, alternating replicas; records every answer."""

    def __init__(self, http: aiohttp.ClientSession, urls: list[str], interval_s: float) -> None:
        self.http, self.urls, self.interval_s = http, urls, interval_s
        self.answers: list[Answer] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.t0 = time.monotonic()

    async def ask(self, session: str, replica: int, body: dict[str, Any]) -> Answer:
        started = time.monotonic()
        try:
            async with self.http.post(
                f"{self.urls[replica]}/v1/chat/completions", json=body,
                headers={"X-Session-ID": session}, timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                payload = await resp.json()
                error = None if resp.status == 200 else payload["error"]["type"]
                answer = Answer(started - self.t0, session, resp.status,
                                resp.headers.get("X-Prompt-Version"),
                                resp.headers.get("X-Prompt-Version-Changed"), error,
                                time.monotonic() - started)
        except (aiohttp.ClientError, TimeoutError) as exc:
            answer = Answer(started - self.t0, session, 0, None, None, type(exc).__name__,
                            time.monotonic() - started)
        self.answers.append(answer)
        return answer

    def start(self, sessions: list[str]) -> None:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._loop(s, n)) for n, s in enumerate(sessions)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _loop(self, session: str, n: int) -> None:
        turn = n
        while not self._stop.is_set():
            turn += 1
            await self.ask(session, turn % 2, LATER)
            await asyncio.sleep(self.interval_s)


def run(cfg: StoreFaultsConfig) -> dict[str, Any]:
    with run_context("store-faults", cfg.out_root, pin=cfg.pin) as ctx:
        runs = {"standalone": run_async(_standalone(ctx, cfg))}
        if cfg.sentinel and shutil.which("redis-sentinel"):
            runs["sentinel"] = run_async(_sentinel(ctx, cfg))
        report = {"scenario": "store-faults", "out": str(ctx.out), "config": asdict(cfg),
                  "machine": ctx.facts, "layout": ctx.layout.describe(),
                  "command": ctx.command, "runs": runs}
        mixed = sum(r["mixed_sessions"] for r in runs.values())
        silent = sum(r["silent_repins"] for r in runs.values())
        slowest = max(p["recovery_s"] or 0.0 for r in runs.values() for p in r["phases"])
        report["targets"] = {
            "mixed_sessions": {"value": mixed, "target": 0, "ok": mixed == 0},
            "silent_repins": {"value": silent, "target": 0, "ok": silent == 0},
            "recovery_s": {"value": slowest, "target": 1.0, "ok": slowest <= 1.0},
        }
        _write(ctx, report)
        return report


async def _fleet(
    ctx: RunContext, cfg: StoreFaultsConfig, url: str, store: dict[str, object], name: str
) -> list[str]:
    """Two POPs (v1, v2) and two replicas, each pinning new sessions to its own version."""
    pops = []
    # One region per version: atomic region cutover would otherwise keep a mixed
    # region's new sessions on its one current version.
    for backend_id, prompt, region in (("pop-v1", "v1", "r1"), ("pop-v2", "v2", "r2")):
        _, pop_url = start_sim_pop(ctx.procs, PopSpec(f"{name}-{backend_id}", region, prompt),
                                   ctx.layout.load_cpus, ctx.layout)
        pops.append((f"{name}-{backend_id}", region, pop_url))
    urls = []
    for replica, admitted in enumerate(("v1", "v2")):
        port = free_port()
        sections: dict[str, dict[str, object]] = {
            "store": {"op_timeout_ms": 300, "touch_interval_s": 1.0, **store},
            "routing": {"pin_wait_ms": 500, "retry_after_s": 1},
            "discovery": {"interval_s": 0.2, "timeout_s": 0.5},
            "versions": {"admitted_for_new_sessions": [admitted]},
        }
        for section, values in parse_overrides(cfg.proxy_set).items():
            sections.setdefault(section, {}).update(values)
        toml = proxy_toml(port=port, backends=pops, redis_url=url, key_prefix=f"bench-{name}:",
                          sections=sections)
        start_pinproxy(ctx.procs, f"{name}-{replica}", toml, port, cpus=ctx.layout.sut_cpus,
                       layout=ctx.layout)
        urls.append(f"http://127.0.0.1:{port}")
    for url_ in urls:
        await wait_ready("127.0.0.1", int(url_.rsplit(":", 1)[1]))
    return urls


async def _standalone(ctx: RunContext, cfg: StoreFaultsConfig) -> dict[str, Any]:
    data = ctx.work / "redis-standalone"
    data.mkdir()
    server = Redis1(ctx.procs, data)
    urls = await _fleet(ctx, cfg, server.url, {}, "standalone")

    def restart_empty() -> None:
        server.kill()
        time.sleep(cfg.outage_s)  # the outage being measured (runs in a thread)
        server.start()

    def pause() -> None:
        server.signal(signal.SIGSTOP)
        time.sleep(cfg.pause_s)  # the pause being measured (runs in a thread)
        server.signal(signal.SIGCONT)

    def flushall() -> None:
        server.client().flushall()

    faults: list[tuple[str, Callable[[], None]]] = [
        ("pause", pause),
        ("kill-restart-empty", restart_empty),
        ("flushall", flushall),
    ]
    return await _replay(cfg, urls, server.port, faults)


async def _sentinel(ctx: RunContext, cfg: StoreFaultsConfig) -> dict[str, Any]:
    binary, sentinel_bin = shutil.which("redis-server"), shutil.which("redis-sentinel")
    assert binary is not None
    assert sentinel_bin is not None
    ports = [free_port(), free_port()]
    nodes = []
    for n, port in enumerate(ports):
        data = ctx.work / f"redis-node-{n}"
        data.mkdir()
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir",
               str(data), "--daemonize", "no"]
        if n:
            cmd += ["--replicaof", "127.0.0.1", str(ports[0])]
        nodes.append(ctx.procs.start(f"redis-node-{n}", cmd, port=port))
    primary = nodes[0]
    sentinels = []
    for n in range(3):
        port = free_port()
        conf = ctx.work / f"sentinel-{n}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {ctx.work}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {ports[0]} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 300\n"
            f"sentinel failover-timeout {MASTER} 2000\n"
        )
        ctx.procs.start(f"sentinel-{n}", [sentinel_bin, str(conf)], port=port)
        sentinels.append(f"127.0.0.1:{port}")
    await _until(lambda: _sentinels_ready(sentinels), 20.0)
    urls = await _fleet(ctx, cfg, "redis://sentinel/0",
                        {"topology": "sentinel", "sentinel_master": MASTER, "sentinels": sentinels},
                        "sentinel")

    def fail_over() -> None:
        primary.stop(signal.SIGKILL)
        deadline = time.monotonic() + 15
        while _master_port(sentinels) == ports[0]:
            if time.monotonic() > deadline:
                raise BenchError("no failover within 15 s")
            time.sleep(0.05)

    return await _replay(cfg, urls, None, [("failover", fail_over)], steady=False)


def _master_port(sentinels: list[str]) -> int:
    host, _, port = sentinels[0].rpartition(":")
    with redis.Redis(host=host, port=int(port), socket_timeout=1.0) as client:
        return int(client.sentinel_get_master_addr_by_name(MASTER)[1])


def _sentinels_ready(sentinels: list[str]) -> bool:
    for address in sentinels:
        host, _, port = address.rpartition(":")
        with redis.Redis(host=host, port=int(port), socket_timeout=1.0) as client:
            if not client.sentinel_slaves(MASTER) or len(client.sentinel_sentinels(MASTER)) < 2:
                return False
    return True


async def _until(check: Callable[[], bool], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            if await asyncio.to_thread(check):
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise BenchError("topology not ready")
        await asyncio.sleep(0.1)


async def _replay(
    cfg: StoreFaultsConfig, urls: list[str], redis_port: int | None,
    faults: list[tuple[str, Callable[[], None]]], *, steady: bool = True,
) -> dict[str, Any]:
    sessions = [f"s{n}" for n in range(cfg.sessions)]
    async with aiohttp.ClientSession() as http:
        traffic = Traffic(http, urls, cfg.interval_s)
        for n, session in enumerate(sessions):
            first = await traffic.ask(session, n % 2, FIRST)
            if first.status != 200:
                raise BenchError(f"first turn of {session} failed: {first}")
        # One turn through each replica, so both hold every pin before anything is measured.
        for n, session in enumerate(sessions):
            for replica in (n % 2, (n + 1) % 2):
                await traffic.ask(session, replica, LATER)
        phases: list[Phase] = []
        if steady and redis_port is not None:
            phases.append(await _measured(traffic, sessions, redis_port, cfg))
            phases.append(await _new_sessions(traffic, redis_port, cfg))
        for name, fault in faults:
            traffic.start(sessions)
            phase = Phase(name, time.monotonic() - traffic.t0)
            await asyncio.sleep(0.5)  # traffic flowing before the fault
            await asyncio.to_thread(fault)
            phase.store_back = time.monotonic() - traffic.t0
            await asyncio.sleep(cfg.phase_s)  # the recovery window being measured
            await traffic.stop()
            phase.ended = time.monotonic() - traffic.t0
            phases.append(phase)
    return _summarize(traffic.answers, phases)


async def _measured(
    traffic: Traffic, sessions: list[str], port: int, cfg: StoreFaultsConfig
) -> Phase:
    before = commandstats(port)
    phase = Phase("steady", time.monotonic() - traffic.t0)
    count = len(traffic.answers)
    traffic.start(sessions)
    await asyncio.sleep(cfg.phase_s)
    await traffic.stop()
    phase.ended = time.monotonic() - traffic.t0
    phase.requests = len(traffic.answers) - count
    phase.commands = _delta(before, commandstats(port))
    return phase


async def _new_sessions(traffic: Traffic, port: int, cfg: StoreFaultsConfig) -> Phase:
    before = commandstats(port)
    phase = Phase("new-sessions", time.monotonic() - traffic.t0)
    await asyncio.gather(*(traffic.ask(f"new-{n}", n % 2, FIRST) for n in range(cfg.new_sessions)))
    phase.ended = time.monotonic() - traffic.t0
    phase.requests = cfg.new_sessions
    phase.commands = _delta(before, commandstats(port))
    return phase


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}


def _summarize(answers: list[Answer], phases: list[Phase]) -> dict[str, Any]:
    first: dict[str, str] = {}
    versions: dict[str, set[str]] = defaultdict(set)
    silent = 0
    for a in sorted(answers, key=lambda a: a.at):
        if a.status != 200 or a.version is None:
            continue
        pinned = first.setdefault(a.session, a.version)
        versions[a.session].add(a.version)
        if a.version != pinned and a.changed is None:
            silent += 1
    out_phases = []
    for phase in phases:
        inside = [a for a in answers if phase.started <= a.at < phase.ended]
        statuses = Counter("200" if a.status == 200 else f"{a.status} {a.error}" for a in inside)
        per_session: dict[str, Counter[str]] = defaultdict(Counter)
        for a in inside:
            if a.status == 200 and a.version:
                per_session[a.session][a.version] += 1
        recovery = None
        if phase.store_back is not None:
            back = phase.store_back
            answered: dict[str, float] = {}
            for a in sorted(inside, key=lambda a: a.at):
                if a.status == 200 and a.at >= back:
                    answered.setdefault(a.session, a.at + a.latency_s - back)
            sessions = {a.session for a in inside}
            recovery = max(answered.values()) if answered and set(answered) >= sessions else None
        out_phases.append({
            "name": phase.name, "requests": len(inside), "statuses": dict(statuses),
            "latency_ms": summarize_ms([a.latency_s for a in inside], (50, 99)),
            "sessions_by_versions": dict(Counter(len(v) for v in per_session.values())),
            "recovery_s": recovery,
            "commands": phase.commands,
            "commands_per_request": (
                round(sum(phase.commands.values()) / phase.requests, 3) if phase.requests else None
            ),
        })
    return {"mixed_sessions": sum(1 for v in versions.values() if len(v) > 1),
            "silent_repins": silent, "phases": out_phases,
            "_raw": [asdict(a) for a in answers]}


def _write(ctx: RunContext, report: dict[str, Any]) -> None:
    raw = {name: run.pop("_raw") for name, run in report["runs"].items()}
    write_json(ctx.out / "report.json", report)
    write_json(ctx.out / "raw.json", raw)
    md = md_header("Store faults under pinned traffic", report["machine"], report["layout"],
                   report["command"])
    for name, run in report["runs"].items():
        md += (f"\n### {name}\n\nSessions answered by two versions: {run['mixed_sessions']}; "
               f"silent re-pins: {run['silent_repins']}.\n\n")
        rows = []
        for p in run["phases"]:
            lat = p["latency_ms"]
            rows.append([p["name"], p["requests"], counts_line(p["statuses"]),
                         lat.get("p50_ms"), lat.get("p99_ms"), lat.get("max_ms"),
                         p["recovery_s"], p["commands_per_request"]])
        md += table(["phase", "requests", "statuses", "p50 ms", "p99 ms", "max ms",
                     "recovery s", "Redis cmds/request"], rows) + "\n"
        for p in run["phases"]:
            if p["commands"]:
                md += f"\n{p['name']} commands: {counts_line(p['commands'])}\n"
    md += "\n## Targets\n\n" + table(
        ["target", "value", "goal", "verdict"],
        [[k, t["value"], t["target"], verdict(t["ok"])] for k, t in report["targets"].items()],
    ) + "\n"
    (ctx.out / "summary.md").write_text(md)


