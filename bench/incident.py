"""Scenario ``incident``: the replay of shared/background.md, with pinning and without.

The fleet: four regions with two simulated POPs each, a rollout paused at 67%
(us-east and eu-west on v47, ap-south and ap-northeast on v46). Two pinproxy replicas
share one Redis; every request of a multi-turn session goes to one of them at random
on a fresh connection, the way GSLB re-picks the nearest healthy POP per connection.
While the traffic runs, the script below plays out (times as fractions of the run):

- latencies shift, so the nearest POP changes: us-east is nearest, then a capacity
  event makes it slow and ap-northeast nearest, then eu-west and ap-south are;
- eu-west-2's health check (``/version``) flaps throughout; its answers stay fine;
- at 40% ap-south-2 silently flips to v47: only its stamps and ``/version`` change;
- at 65% ap-northeast completes its cutover: both replicas flip to v47 at once.

Exactly the same traffic (same seed, same schedule) then goes through two replicas
with ``routing.pinning = false``: a plain latency router, the control. The version a
client saw is read from the answer's body (the model's own words), not from a proxy
header. Reported for both: sessions that saw more than one version, failed requests
and why (and whether pinning caused them while the pinned version was still served
somewhere), and the share of traffic by version and region over time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.common import RunContext, run_async, run_context, wait_ready
from bench.procs import free_port, parse_overrides, proxy_toml, start_pinproxy, start_redis
from bench.report import COLORS, _pyplot, md_header, verdict, write_json
from bench.stats import counts_line, table
from proxy.core.models import VersionBundle
from proxy.sim import PopState, SimPop

REGIONS = ("us-east", "eu-west", "ap-south", "ap-northeast")
INITIAL = {"us-east": "v47", "eu-west": "v47", "ap-south": "v46", "ap-northeast": "v46"}
# Time to first byte per region (ms) in each latency phase: who is "nearest" changes.
PHASES: tuple[tuple[float, dict[str, float]], ...] = (
    (0.0, {"us-east": 2, "eu-west": 8, "ap-south": 5, "ap-northeast": 10}),
    (0.3, {"us-east": 25, "eu-west": 6, "ap-south": 9, "ap-northeast": 2}),
    (0.6, {"us-east": 7, "eu-west": 2, "ap-south": 3, "ap-northeast": 12}),
)
FLAPPING = "eu-west-2"
SILENT_FLIP = ("ap-south-2", 0.40, "v47")
CUTOVER = ("ap-northeast", 0.65, "v47")
FLAP_PERIOD_S = 1.0  # /version fails for this long, then answers for this long
_BODY_VERSION = re.compile(r"\[(?P<backend>[A-Za-z0-9._-]+) (?P<prompt>[A-Za-z0-9._:/@+~-]+)\]")


@dataclass(frozen=True, slots=True)
class IncidentConfig:
    duration_s: float = 20.0
    sessions: int = 240
    turns: int = 6
    poll_interval_s: float = 0.5
    stream_every: int = 3  # every n-th turn streams (SSE)
    buckets: int = 20
    seed: int = 47
    proxy_set: tuple[str, ...] = ()
    pin: bool = True
    out_root: Path | None = None


@dataclass(frozen=True, slots=True)
class _Planned:
    at: float  # seconds after the run starts
    session: str
    turn: int
    replica: int
    stream: bool


@dataclass
class _Outcome:
    at: float
    session: str
    turn: int
    replica: int
    stream: bool
    status: int = 0
    version: str | None = None  # prompt version the answer's body came from
    header_version: str | None = None
    backend: str | None = None
    region: str | None = None
    error: str | None = None
    pinned_version: str | None = None
    served_somewhere: bool | None = None


@dataclass
class _Timeline:
    """What each POP served when: the ground truth failures are judged against."""

    versions: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    events: list[tuple[float, str]] = field(default_factory=list)

    def set(self, t: float, backend_id: str, prompt: str) -> None:
        self.versions.setdefault(backend_id, []).append((t, prompt))

    def served_at(self, t: float, prompt: str) -> bool:
        for changes in self.versions.values():
            current = None
            for at, version in changes:
                if at <= t:
                    current = version
            if current == prompt:
                return True
        return False


def plan(cfg: IncidentConfig) -> list[_Planned]:
    """The traffic: seeded, so the pinproxy run and the control get the same."""
    rng = random.Random(cfg.seed)
    span = cfg.duration_s * 0.5  # a session lasts about half the run: it sees changes
    think = span / max(1, cfg.turns - 1)
    out = []
    for s in range(cfg.sessions):
        start = rng.uniform(0.02, max(0.03, cfg.duration_s - span - 0.1))
        for turn in range(cfg.turns):
            at = start + turn * think * rng.uniform(0.8, 1.2)
            out.append(
                _Planned(
                    min(at, cfg.duration_s - 0.05),
                    f"s{s:04d}",
                    turn,
                    rng.randrange(2),
                    cfg.stream_every > 0 and turn % cfg.stream_every == cfg.stream_every - 1,
                )
            )
    # A session's turns stay in order even where jitter would swap them.
    by_session: dict[str, list[_Planned]] = defaultdict(list)
    for p in out:
        by_session[p.session].append(p)
    return sorted((p for ps in by_session.values() for p in ps), key=lambda p: p.at)


def _initial_state(pop: SimPop) -> None:
    region = pop.state.region
    pop.state.version = VersionBundle(prompt=INITIAL[region])
    pop.state.ttfb_ms = PHASES[0][1][region]
    pop.state.version_endpoint_ok = True


async def _script(pops: dict[str, SimPop], cfg: IncidentConfig, t0: float, tl: _Timeline) -> None:
    """Plays the incident on the POPs; every change is recorded in ``tl``."""
    loop = asyncio.get_running_loop()
    d = cfg.duration_s
    actions: list[tuple[float, str, Any]] = []
    for frac, ttfb in PHASES[1:]:
        actions.append(
            (frac * d, f"latency phase: {min(ttfb, key=ttfb.__getitem__)} nearest", ttfb)
        )
    actions.append(
        (SILENT_FLIP[1] * d, f"{SILENT_FLIP[0]} silently flips to {SILENT_FLIP[2]}", "flip")
    )
    actions.append((CUTOVER[1] * d, f"{CUTOVER[0]} completes cutover to {CUTOVER[2]}", "cutover"))
    flap_at = FLAP_PERIOD_S * 0.5
    ok = True
    while flap_at < d:
        ok = not ok
        actions.append((flap_at, f"{FLAPPING} /version {'recovers' if ok else 'fails'}", ok))
        flap_at += FLAP_PERIOD_S
    actions.sort(key=lambda a: a[0])
    for at, label, what in actions:
        await asyncio.sleep(max(0.0, t0 + at - loop.time()))
        now = loop.time() - t0
        if isinstance(what, dict):
            for pop in pops.values():
                pop.state.ttfb_ms = what[pop.state.region]
        elif what == "flip":
            pops[SILENT_FLIP[0]].flip(VersionBundle(prompt=SILENT_FLIP[2]))
            tl.set(now, SILENT_FLIP[0], SILENT_FLIP[2])
        elif what == "cutover":
            # Atomic per-region cutover: both replicas in the same instant.
            for pop in pops.values():
                if pop.state.region == CUTOVER[0]:
                    pop.flip(VersionBundle(prompt=CUTOVER[2]))
                    tl.set(now, pop.state.backend_id, CUTOVER[2])
        else:
            pops[FLAPPING].state.version_endpoint_ok = bool(what)
        if not label.startswith(FLAPPING):
            tl.events.append((round(now, 3), label))


async def _one(
    http: aiohttp.ClientSession, url: str, p: _Planned, t0: float, loop: asyncio.AbstractEventLoop
) -> _Outcome:
    out = _Outcome(round(loop.time() - t0, 4), p.session, p.turn, p.replica, p.stream)
    body: dict[str, Any] = {
        "model": "sim",
        "messages": [{"role": "user", "content": f"turn {p.turn}"}],
    }
    if p.stream:
        body["stream"] = True
    try:
        async with http.post(
            url,
            data=orjson.dumps(body),
            headers={"X-Session-ID": p.session, "Content-Type": "application/json"},
        ) as resp:
            raw = await resp.read()
            out.status = resp.status
            out.header_version = resp.headers.get("X-Prompt-Version")
            out.backend = resp.headers.get("X-Served-By")
            out.region = resp.headers.get("X-Served-Region")
    except (aiohttp.ClientError, TimeoutError) as exc:
        out.error = f"client:{type(exc).__name__}"
        return out
    text = raw.decode(errors="replace")
    if out.status == 200:
        match = _BODY_VERSION.search(text)
        if match is None:
            out.error = "answer_without_version"
        else:
            out.version = match.group("prompt")
            out.backend = out.backend or match.group("backend")
        return out
    try:
        err = orjson.loads(raw)["error"]
        out.error = str(err.get("type") or f"status_{out.status}")
        out.pinned_version = err.get("pinned_version")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        out.error = f"status_{out.status}"
    return out


async def _drive(
    urls: list[str], pops: dict[str, SimPop], cfg: IncidentConfig, planned: list[_Planned]
) -> tuple[list[_Outcome], _Timeline]:
    loop = asyncio.get_running_loop()
    tl = _Timeline()
    for pop in pops.values():
        tl.set(0.0, pop.state.backend_id, pop.state.version.prompt)
    # force_close: a new TCP connection per request, so nothing but the replica choice
    # (the GSLB's) decides which proxy sees a turn.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    results: list[_Outcome] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        t0 = loop.time() + 0.05
        script = loop.create_task(_script(pops, cfg, t0, tl))
        tasks: list[asyncio.Task[_Outcome]] = []
        previous: dict[str, asyncio.Task[_Outcome]] = {}

        async def turn(p: _Planned, before: asyncio.Task[_Outcome] | None) -> _Outcome:
            if before is not None:  # a user sends the next turn after the last answer
                with contextlib.suppress(Exception):
                    await before
            await asyncio.sleep(max(0.0, t0 + p.at - loop.time()))
            return await _one(http, urls[p.replica] + "/v1/chat/completions", p, t0, loop)

        for p in planned:
            task = loop.create_task(turn(p, previous.get(p.session)))
            previous[p.session] = task
            tasks.append(task)
        try:
            results = list(await asyncio.gather(*tasks))
            await script
        finally:
            script.cancel()
            for task in tasks:
                task.cancel()
    for r in results:
        if r.error == "version_unavailable" and r.pinned_version:
            prompt = VersionBundle.from_mapping(
                dict(kv.split("=", 1) for kv in r.pinned_version.split(","))
            ).prompt
            r.served_somewhere = tl.served_at(r.at, prompt)
    return results, tl


def _analyse(results: list[_Outcome], cfg: IncidentConfig) -> dict[str, Any]:
    seen: dict[str, set[str]] = defaultdict(set)
    for r in results:
        if r.version is not None:
            seen[r.session].add(r.version)
    mixed = sorted(s for s, v in seen.items() if len(v) > 1)
    failures = Counter(r.error for r in results if r.error is not None)
    attributable = sum(
        1 for r in results if r.error == "version_unavailable" and r.served_somewhere
    )
    header_disagrees = sum(
        1 for r in results if r.version and r.header_version and r.version != r.header_version
    )
    ok = [r for r in results if r.version is not None]
    width = cfg.duration_s / cfg.buckets
    series: dict[str, dict[str, list[int]]] = {
        region: {v: [0] * cfg.buckets for v in ("v46", "v47")} for region in REGIONS
    }
    for r in ok:
        b = min(cfg.buckets - 1, int(r.at / width))
        region = r.region or "unknown"
        if region in series and r.version in series[region]:
            series[region][r.version][b] += 1
    by_version = Counter(r.version for r in ok)
    by_region = {
        region: dict(Counter(r.version for r in ok if r.region == region)) for region in REGIONS
    }
    return {
        "requests": len(results),
        "succeeded": len(ok),
        "failed": sum(failures.values()),
        "failures_by_reason": dict(failures),
        "failures_attributable_to_pinning_while_served": attributable,
        "sessions": len({r.session for r in results}),
        "sessions_mixed_versions": len(mixed),
        "mixed_session_ids": mixed[:50],
        "header_body_disagreements": header_disagrees,
        "share_by_version": {
            v: round(n / max(1, len(ok)), 4) for v, n in sorted(by_version.items())
        },
        "by_region": by_region,
        "over_time": {"bucket_s": round(width, 3), "series": series},
    }


def run(cfg: IncidentConfig) -> dict[str, Any]:
    with run_context("incident", cfg.out_root, pin=cfg.pin) as ctx:
        _, redis_url = start_redis(ctx.procs, ctx.layout)
        planned = plan(cfg)
        report = run_async(_run(ctx, cfg, planned, redis_url))
        _write(ctx, report)
        return report


async def _run(
    ctx: RunContext, cfg: IncidentConfig, planned: list[_Planned], redis_url: str
) -> dict[str, Any]:
    pops: dict[str, SimPop] = {}
    try:
        for region in REGIONS:
            for i in (1, 2):
                pop = SimPop(PopState.create(f"{region}-{i}", region, INITIAL[region]))
                _initial_state(pop)
                await pop.start("127.0.0.1", 0)
                pops[pop.state.backend_id] = pop
        backends = [(b, p.state.region, p.url) for b, p in pops.items()]
        modes: dict[str, list[str]] = {}
        sections: dict[str, dict[str, object]] = {
            "discovery": {"interval_s": cfg.poll_interval_s, "timeout_s": 0.5, "jitter": 0.1},
            "routing": {"pin_wait_ms": 2000, "retry_after_s": 1},
        }
        for mode, pinning in (("pinproxy", True), ("control", False)):
            urls = []
            for replica in (1, 2):
                port = free_port()
                extra = {k: dict(v) for k, v in sections.items()}
                extra["routing"]["pinning"] = pinning
                for name, values in parse_overrides(cfg.proxy_set).items():
                    extra.setdefault(name, {}).update(values)
                toml = proxy_toml(
                    port=port,
                    backends=backends,
                    redis_url=redis_url,
                    key_prefix=f"bench-incident-{mode}:",
                    sections=extra,
                )
                # Replicas and POPs share the load CPUs: this is a correctness replay.
                start_pinproxy(
                    ctx.procs,
                    f"{mode}-{replica}",
                    toml,
                    port,
                    cpus=ctx.layout.load_cpus if replica == 1 else ctx.layout.sut_cpus,
                    layout=ctx.layout,
                )
                urls.append(f"http://127.0.0.1:{port}")
            modes[mode] = urls
        for urls in modes.values():
            for url in urls:
                await wait_ready("127.0.0.1", int(url.rsplit(":", 1)[1]))
        runs: dict[str, Any] = {}
        raw: dict[str, Any] = {}
        for mode, urls in modes.items():
            for pop in pops.values():
                _initial_state(pop)
            # Let every replica see the reset fleet (and the flapper healthy) first.
            await asyncio.sleep(max(1.0, 5 * cfg.poll_interval_s))
            started = time.monotonic()
            results, tl = await _drive(urls, pops, cfg, planned)
            runs[mode] = _analyse(results, cfg) | {
                "wall_s": round(time.monotonic() - started, 2),
                "events": tl.events,
            }
            raw[mode] = [asdict(r) for r in results]
    finally:
        for pop in pops.values():
            await pop.stop()
    p, c = runs["pinproxy"], runs["control"]
    targets = {
        "pinproxy_mixed_sessions": {
            "target": 0,
            "value": p["sessions_mixed_versions"],
            "ok": p["sessions_mixed_versions"] == 0,
        },
        "pinproxy_failures_attributable_to_pinning": {
            "target": 0,
            "value": p["failures_attributable_to_pinning_while_served"],
            "ok": p["failures_attributable_to_pinning_while_served"] == 0,
        },
        "control_shows_damage": {
            "target": "> 0 mixed sessions",
            "value": c["sessions_mixed_versions"],
            "ok": c["sessions_mixed_versions"] > 0,
        },
    }
    return {
        "scenario": "incident",
        "out": str(ctx.out),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "command": ctx.command,
        "machine": ctx.facts,
        "layout": ctx.layout.describe(),
        "fleet": {
            "initial": INITIAL,
            "latency_phases": [[f, t] for f, t in PHASES],
            "flapping_health_check": FLAPPING,
            "silent_flip": list(SILENT_FLIP),
            "cutover": list(CUTOVER),
        },
        "runs": runs,
        "targets": targets,
        "_raw": raw,
    }


def _write(ctx: RunContext, report: dict[str, Any]) -> None:
    out = ctx.out
    raw = report.pop("_raw")
    write_json(out / "report.json", report)
    write_json(out / "raw.json", raw)
    _versions_plot(out / "versions-over-time.png", report)
    runs = report["runs"]
    md = md_header(
        "Incident replay: rollout paused at 67%",
        report["machine"],
        report["layout"],
        report["command"],
    )
    cfg = report["config"]
    md += (
        f"{cfg['sessions']} sessions x {cfg['turns']} turns over {cfg['duration_s']} s, each turn "
        f"sent to one of two replicas at random on a new connection; proxies poll `/version` "
        f"every {cfg['poll_interval_s']} s. Same traffic through pinproxy and through the "
        "control (`routing.pinning = false`).\n\nEvents (pinproxy run): "
        + "; ".join(f"{t:.1f} s {label}" for t, label in runs["pinproxy"]["events"])
        + f"; {FLAPPING}'s health check flaps every {FLAP_PERIOD_S} s throughout.\n\n"
    )
    rows = []
    for mode in ("pinproxy", "control"):
        r = runs[mode]
        rows.append(
            [
                mode,
                r["requests"],
                r["succeeded"],
                r["sessions"],
                r["sessions_mixed_versions"],
                r["failed"],
                counts_line(r["failures_by_reason"]),
                r["failures_attributable_to_pinning_while_served"],
                counts_line({k: f"{v:.0%}" for k, v in r["share_by_version"].items()}),
            ]
        )
    md += table(
        [
            "run",
            "requests",
            "answered",
            "sessions",
            "sessions with >1 version",
            "failed",
            "failures by reason",
            "failed by pinning while version served",
            "traffic by version",
        ],
        rows,
    )
    t = report["targets"]
    md += "\n\n" + table(
        ["target", "goal", "measured", "verdict"],
        [
            [
                "pinproxy: sessions that saw more than one version",
                "0",
                t["pinproxy_mixed_sessions"]["value"],
                verdict(t["pinproxy_mixed_sessions"]["ok"]),
            ],
            [
                "pinproxy: failures attributable to pinning",
                "0",
                t["pinproxy_failures_attributable_to_pinning"]["value"],
                verdict(t["pinproxy_failures_attributable_to_pinning"]["ok"]),
            ],
            [
                "control: sessions that saw more than one version",
                "> 0",
                t["control_shows_damage"]["value"],
                verdict(t["control_shows_damage"]["ok"]),
            ],
        ],
    )
    md += "\n\nTraffic by region and version:\n\n" + table(
        ["region", "pinproxy", "control"],
        [
            [
                region,
                counts_line(runs["pinproxy"]["by_region"][region]),
                counts_line(runs["control"]["by_region"][region]),
            ]
            for region in REGIONS
        ],
    )
    md += "\n\n![versions served over time per region](versions-over-time.png)\n"
    (out / "summary.md").write_text(md)


def _versions_plot(path: Path, report: dict[str, Any]) -> None:
    plt = _pyplot()
    runs = report["runs"]
    fig, axes = plt.subplots(2, len(REGIONS), figsize=(15, 6.4), sharex=True, sharey=True)
    for row, mode in enumerate(("pinproxy", "control")):
        over = runs[mode]["over_time"]
        width = over["bucket_s"]
        for col, region in enumerate(REGIONS):
            ax = axes[row][col]
            series = over["series"][region]
            xs = [i * width for i in range(len(series["v46"]))]
            ax.bar(
                xs, series["v46"], width=width * 0.9, align="edge", color=COLORS["v46"], label="v46"
            )
            ax.bar(
                xs,
                series["v47"],
                width=width * 0.9,
                align="edge",
                bottom=series["v46"],
                color=COLORS["v47"],
                label="v47",
            )
            for t, label in runs[mode]["events"]:
                if "flip" in label or "cutover" in label:
                    ax.axvline(t, color="#333333", ls="--", lw=0.9)
            if row == 0:
                ax.set_title(region, fontweight="bold")
            if col == 0:
                mixed = runs[mode]["sessions_mixed_versions"]
                ax.set_ylabel(f"{mode}\nanswers per {width:.1f} s\n({mixed} mixed sessions)")
            if row == 1:
                ax.set_xlabel("time (s)")
            ax.grid(axis="x", visible=False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", title="prompt version")
    fig.suptitle(
        "Versions served over time per region (dashed: silent flip of ap-south-2, "
        "ap-northeast cutover)",
        fontweight="bold",
    )
    fig.tight_layout(rect=(0, 0, 0.94, 0.95))
    fig.savefig(path)
    plt.close(fig)
