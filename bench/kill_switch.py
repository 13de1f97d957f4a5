"""Scenario ``kill-switch``: the incident replay with a bad v47 that the soak judge stops.

The fleet: four regions with two simulated POPs each, all on v46, whose JSON answers
fail to parse once in ``good_every`` (0.1% by default). Two pinproxy replicas share
one Redis and run the rollout discipline with ``on_regression = "block_and_repin"``.
Every turn of a multi-turn session asks for JSON output and goes to one of the two
replicas at random on a fresh connection (the GSLB). At ``cutover_at`` of the run,
us-east completes its cutover to a bad v47: both its POPs flip at once and one JSON
answer in ``bad_every`` (10% by default) does not parse. The deploy system never
rolls them back: from then on only pinproxy stands between users and v47.

Reported: when the region flipped and when the kill switch tripped (from the
replicas' own ``GET /admin/rollout`` events, with the evidence), the time to trip,
the sessions exposed to v47 before and after the trip, every change of version a
session saw and whether its answer said so (``X-Prompt-Version-Changed``), and
failures by reason. The version a client saw is read from the answer's body.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.common import RunContext, run_async, run_context, wait_ready
from bench.incident import REGIONS, IncidentConfig, plan
from bench.procs import free_port, parse_overrides, proxy_toml, start_pinproxy, start_redis
from bench.report import COLORS, _pyplot, md_header, verdict, write_json
from bench.stats import counts_line, table
from proxy.core.models import VersionBundle
from proxy.sim import PopState, SimPop

BAD_REGION = "us-east"
# The sim's JSON-mode content is {"backend_id": ..., "prompt": ..., ...}, cut short when bad.
_JSON_PROMPT = re.compile(r'"prompt":"([A-Za-z0-9._:/@+~-]+)"')


@dataclass(frozen=True, slots=True)
class KillSwitchConfig:
    duration_s: float = 30.0
    sessions: int = 300
    turns: int = 6
    poll_interval_s: float = 0.2
    cutover_at: float = 0.2  # fraction of the run
    good_every: int = 1000  # v46: one JSON answer in this many does not parse
    bad_every: int = 10  # v47: one in this many
    min_samples: int = 100  # rollout.min_samples
    soak_s: float = 600.0
    seed: int = 47
    proxy_set: tuple[str, ...] = ()
    pin: bool = True
    out_root: Path | None = None


@dataclass
class _Answer:
    session: str
    turn: int
    replica: int
    started: float  # wall clock
    ended: float = 0.0
    status: int = 0
    version: str | None = None  # from the answer's body
    region: str | None = None
    changed: str | None = None  # X-Prompt-Version-Changed
    error: str | None = None


@dataclass
class _Fleet:
    pops: dict[str, SimPop] = field(default_factory=dict)
    cutover_wall: float | None = None


async def _ask(http: aiohttp.ClientSession, url: str, session: str, turn: int,
               replica: int) -> _Answer:
    out = _Answer(session, turn, replica, time.time())
    body = {"model": "sim", "messages": [{"role": "user", "content": f"turn {turn}"}],
            "response_format": {"type": "json_object"}}
    try:
        async with http.post(url, data=orjson.dumps(body), headers={
            "X-Session-ID": session, "Content-Type": "application/json"}) as resp:
            raw = await resp.read()
            out.status = resp.status
            out.region = resp.headers.get("X-Served-Region")
            out.changed = resp.headers.get("X-Prompt-Version-Changed")
    except (aiohttp.ClientError, TimeoutError) as exc:
        out.error = f"client:{type(exc).__name__}"
        return out
    finally:
        out.ended = time.time()
    if out.status == 200:
        out.version = _served(raw)
        if out.version is None:
            out.error = "answer_without_version"
    else:
        try:
            out.error = str(orjson.loads(raw)["error"].get("type") or f"status_{out.status}")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            out.error = f"status_{out.status}"
    return out


def _served(raw: bytes) -> str | None:
    """The prompt version in a JSON-mode answer's content (parseable or cut short)."""
    try:
        content = orjson.loads(raw)["choices"][0]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    match = _JSON_PROMPT.search(str(content))
    return None if match is None else match.group(1)


async def _drive(urls: list[str], fleet: _Fleet, cfg: KillSwitchConfig) -> list[_Answer]:
    planned = plan(IncidentConfig(duration_s=cfg.duration_s, sessions=cfg.sessions,
                                  turns=cfg.turns, stream_every=0, seed=cfg.seed))
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as http:
        t0 = loop.time() + 0.05

        async def cutover() -> None:
            await asyncio.sleep(max(0.0, t0 + cfg.cutover_at * cfg.duration_s - loop.time()))
            fleet.cutover_wall = time.time()
            for pop in fleet.pops.values():
                if pop.state.region == BAD_REGION:  # both replicas in the same instant
                    pop.state.json_invalid_every = cfg.bad_every
                    pop.flip(VersionBundle(prompt="v47"))

        previous: dict[str, asyncio.Task[_Answer]] = {}
        tasks: list[asyncio.Task[_Answer]] = []

        async def turn(p: Any, before: asyncio.Task[_Answer] | None) -> _Answer:
            if before is not None:  # the next turn follows the last answer
                with contextlib.suppress(Exception):
                    await before
            await asyncio.sleep(max(0.0, t0 + p.at - loop.time()))
            return await _ask(http, urls[p.replica] + "/v1/chat/completions", p.session,
                              p.turn, p.replica)

        script = loop.create_task(cutover())
        for p in planned:
            task = loop.create_task(turn(p, previous.get(p.session)))
            previous[p.session] = task
            tasks.append(task)
        try:
            answers = list(await asyncio.gather(*tasks))
            await script
        finally:
            script.cancel()
    return answers


def analyse(answers: list[_Answer], events: list[dict[str, Any]],
            cutover_wall: float | None, grace_s: float) -> dict[str, Any]:
    """The kill switch's timing and what users saw; pure over the run's records."""
    flipped = next((e for e in events if e["kind"] == "flipped" and e["region"] == BAD_REGION
                    and e["version"] == "prompt=v47"), None)
    trip = next((e for e in events if e["kind"] == "regression"), None)
    trip_at = None if trip is None else float(trip["at"])
    bad = [a for a in answers if a.version == "v47"]
    before = {a.session for a in bad if trip_at is None or a.started < trip_at}
    after = {a.session for a in bad if trip_at is not None and a.started >= trip_at}
    late = [a for a in bad if trip_at is not None and a.started >= trip_at + grace_s]
    by_session: dict[str, list[_Answer]] = defaultdict(list)
    # In the order they were sent (a session's turns are chained, but the plan's jitter
    # may number them out of order): the first answer after a change must say so.
    for a in sorted(answers, key=lambda a: (a.session, a.started)):
        if a.version is not None:
            by_session[a.session].append(a)
    changes: Counter[str] = Counter()
    for turns in by_session.values():
        for prev, cur in pairwise(turns):
            if prev.version != cur.version:
                changes["marked" if cur.changed else "unmarked"] += 1
    failures = Counter(a.error for a in answers if a.error is not None)
    return {
        "requests": len(answers),
        "answered": sum(1 for a in answers if a.version is not None),
        "failures_by_reason": dict(failures),
        "cutover_wall": cutover_wall,
        "flipped_at": None if flipped is None else flipped["at"],
        "tripped": trip is not None,
        "tripped_at": trip_at,
        "time_to_trip_s": None if trip_at is None or flipped is None
        else round(trip_at - float(flipped["at"]), 3),
        "time_from_pop_flip_s": None if trip_at is None or cutover_wall is None
        else round(trip_at - cutover_wall, 3),
        "evidence": None if trip is None else trip["detail"],
        "v47_answers": len(bad),
        "sessions_exposed_before_trip": len(before),
        "sessions_exposed_after_trip": len(after - before),
        "v47_answers_started_after_trip": sum(1 for a in bad if trip_at and a.started >= trip_at),
        "v47_answers_after_grace": len(late),
        "grace_s": grace_s,
        "version_changes": {"marked": changes["marked"], "unmarked": changes["unmarked"]},
        "rolled_back": sorted({e["region"] for e in events if e["kind"] == "rolled_back"}),
    }


def run(cfg: KillSwitchConfig) -> dict[str, Any]:
    with run_context("kill-switch", cfg.out_root, pin=cfg.pin) as ctx:
        _, redis_url = start_redis(ctx.procs, ctx.layout)
        report = run_async(_run(ctx, cfg, redis_url))
        _write(ctx, report)
        return report


async def _run(ctx: RunContext, cfg: KillSwitchConfig, redis_url: str) -> dict[str, Any]:
    fleet = _Fleet()
    check_s = 0.2
    try:
        for region in REGIONS:
            for i in (1, 2):
                pop = SimPop(PopState.create(f"{region}-{i}", region, "v46",
                                             json_invalid_every=cfg.good_every))
                await pop.start("127.0.0.1", 0)
                fleet.pops[pop.state.backend_id] = pop
        backends = [(b, p.state.region, p.url) for b, p in fleet.pops.items()]
        urls, admins = [], []
        for replica in (1, 2):
            port, admin_port = free_port(), free_port()
            sections: dict[str, dict[str, object]] = {
                "discovery": {"interval_s": cfg.poll_interval_s, "timeout_s": 0.5, "jitter": 0.1},
                "routing": {"pin_wait_ms": 2000, "retry_after_s": 1},
                "admin": {"enabled": True, "port": admin_port},
                "rollout": {"on_regression": "block_and_repin", "min_samples": cfg.min_samples,
                            "soak_s": cfg.soak_s, "check_interval_s": check_s},
            }
            for name, values in parse_overrides(cfg.proxy_set).items():
                sections.setdefault(name, {}).update(values)
            toml = proxy_toml(port=port, backends=backends, redis_url=redis_url,
                              key_prefix="bench-kill-switch:", sections=sections)
            start_pinproxy(ctx.procs, f"pinproxy-{replica}", toml, port, layout=ctx.layout,
                           cpus=ctx.layout.load_cpus if replica == 1 else ctx.layout.sut_cpus)
            urls.append(f"http://127.0.0.1:{port}")
            admins.append(f"http://127.0.0.1:{admin_port}")
        for url in urls:
            await wait_ready("127.0.0.1", int(url.rsplit(":", 1)[1]))
        started = time.monotonic()
        answers = await _drive(urls, fleet, cfg)
        wall_s = round(time.monotonic() - started, 2)
        events: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as http:
            for admin in admins:  # the decisions are shared: each replica lists its own
                async with http.get(f"{admin}/admin/rollout") as resp:
                    events += (await resp.json())["events"]
        unique = {(e["kind"], e["region"], e["version"], e["at"]): e for e in events}
        events = sorted(unique.values(), key=lambda e: e["at"])
    finally:
        for pop in fleet.pops.values():
            await pop.stop()
    result = analyse(answers, events, fleet.cutover_wall, grace_s=2 * check_s + 0.5)
    targets = {
        "kill_switch_tripped": {"target": True, "value": result["tripped"],
                                "ok": result["tripped"]},
        "unmarked_version_changes": {"target": 0,
                                     "value": result["version_changes"]["unmarked"],
                                     "ok": result["version_changes"]["unmarked"] == 0},
        "v47_after_trip": {"target": 0, "value": result["v47_answers_after_grace"],
                           "ok": result["v47_answers_after_grace"] == 0},
    }
    return {
        "scenario": "kill-switch",
        "out": str(ctx.out),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "command": ctx.command,
        "machine": ctx.facts,
        "layout": ctx.layout.describe(),
        "result": result | {"wall_s": wall_s},
        "events": events,
        "targets": targets,
        "_raw": [asdict(a) for a in answers],
    }


def _write(ctx: RunContext, report: dict[str, Any]) -> None:
    out = ctx.out
    raw = report.pop("_raw")
    write_json(out / "report.json", report)
    write_json(out / "raw.json", raw)
    _plot(out / "versions-over-time.png", report, raw)
    r, cfg, t = report["result"], report["config"], report["targets"]
    md = md_header("Kill switch: a bad v47 cut over in us-east", report["machine"],
                   report["layout"], report["command"])
    md += (
        f"{cfg['sessions']} sessions x {cfg['turns']} JSON-mode turns over "
        f"{cfg['duration_s']} s through two replicas; all regions on v46 (1 in "
        f"{cfg['good_every']} answers unparseable) until {BAD_REGION} cuts over to v47 (1 in "
        f"{cfg['bad_every']}) at {cfg['cutover_at']:.0%} of the run; "
        f"`rollout.min_samples = {cfg['min_samples']}`, `on_regression = block_and_repin`.\n\n"
    )
    md += table(["measure", "value"], [
        ["region flipped to v47 -> kill switch tripped", f"{r['time_to_trip_s']} s"],
        ["POPs flipped -> kill switch tripped", f"{r['time_from_pop_flip_s']} s"],
        ["evidence", counts_line(r["evidence"] or {})],
        ["sessions exposed to v47 before the trip", r["sessions_exposed_before_trip"]],
        ["sessions first exposed after the trip", r["sessions_exposed_after_trip"]],
        ["v47 answers to requests started after the trip (+ grace)",
         f"{r['v47_answers_started_after_trip']} ({r['v47_answers_after_grace']} after "
         f"{r['grace_s']} s)"],
        ["version changes seen by sessions", counts_line(r["version_changes"])],
        ["regions rolled back", ", ".join(r["rolled_back"]) or "none"],
        ["requests / answered", f"{r['requests']} / {r['answered']}"],
        ["failures by reason", counts_line(r["failures_by_reason"])],
    ])
    md += "\n\n" + table(["target", "goal", "measured", "verdict"], [
        [name, v["target"], v["value"], verdict(v["ok"])] for name, v in t.items()
    ])
    md += "\n\n![versions served over time](versions-over-time.png)\n"
    (out / "summary.md").write_text(md)


def _plot(path: Path, report: dict[str, Any], raw: list[dict[str, Any]]) -> None:
    plt = _pyplot()
    r = report["result"]
    answered = [a for a in raw if a["version"] is not None]
    if not answered:
        return
    t0 = min(a["started"] for a in raw)
    span = max(a["started"] for a in raw) - t0 + 1e-9
    buckets = 30
    width = span / buckets
    fig, ax = plt.subplots(figsize=(10, 4))
    bottom = [0] * buckets
    for version in ("v46", "v47"):
        counts = [0] * buckets
        for a in answered:
            if a["version"] == version:
                counts[min(buckets - 1, int((a["started"] - t0) / width))] += 1
        xs = [i * width for i in range(buckets)]
        ax.bar(xs, counts, width=width * 0.9, align="edge", bottom=bottom,
               color=COLORS.get(version), label=version)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    for at, label in ((r["cutover_wall"], "us-east flips"), (r["tripped_at"], "kill switch")):
        if at is not None:
            ax.axvline(at - t0, color="#333333", ls="--", lw=0.9)
            ax.text(at - t0, max(bottom) * 0.95, f" {label}", fontsize=8)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"answers per {width:.1f} s")
    ax.legend(title="prompt version")
    ax.set_title("Answers by prompt version (all regions)", fontweight="bold")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

