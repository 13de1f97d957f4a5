"""Scenario ``throughput``: each target's ceiling, then its latency at fixed offered rates.

Targets, in one run and against one backend: ``direct`` (the backend itself),
``pinproxy-1w`` and ``pinproxy-2w`` (1 and 2 worker processes, Redis pins), ``nginx``
(one worker, upstream chosen by a consistent hash of the session header: the compiled
floor, when nginx is installed) and ``vllm-router`` (Rust, ``consistent_hash`` policy:
the session-affine router pinproxy's CPU per request is judged against, when the
``bench`` extra is installed) and ``python-floor`` (bench/floor_proxy.py: uvloop and
httptools relaying bytes and nothing else, the least any Python proxy costs here, so
a report tells the language's share of pinproxy's CPU from pinproxy's own; not in the
default set).

The session mix is the issue's harder case by default: 64 connections, 1,000 session
ids, one request per session in turn (``turns``), and every measured run on session
ids of its own (``fresh_sessions``), so a run pays for creating its 1,000 pins as a
real population of new conversations does, not only for cache hits.

For each target: a closed-loop run finds the ceiling (requests/s with ``concurrency``
connections, wrk when installed); then open-loop runs offer constant rates at
``levels`` of that ceiling, with latency measured from each request's intended send
time (no coordinated omission). CPU seconds of the target's whole process tree come
from /proc, so "CPU per 1,000 requests" is independent of where the bottleneck is.

The backend: a POP that answers from memory (nginx with canned, stamped answers) when
nginx is installed, so no proxy's ceiling is secretly the backend's; otherwise the
simulated POP. The simulated POP's own ceiling, on the proxy's core, is measured too,
so a slow mock can never pass for a slow proxy.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bench.common import RunContext, port_of, run_async, run_context, wait_ready
from bench.httpload import LoadResult, closed_loop, find_wrk, open_loop, run_wrk, session_requests
from bench.procs import (
    PopSpec,
    Proc,
    find_nginx,
    find_vllm_router,
    free_port,
    machine_busy_seconds,
    nginx_proxy_conf,
    nginx_static_pop_conf,
    proxy_source,
    start_nginx,
    start_pinproxy_in_front,
    start_python_floor,
    start_redis,
    start_sim_pop,
    start_vllm_router,
)
from bench.report import bar_plot, cdf_plot, md_header, verdict, write_json
from bench.stats import as_us, fmt, subsample, table
from bench.worker_pins import check_pins_across_workers

if TYPE_CHECKING:
    from collections.abc import Sequence

TARGETS = ("direct", "pinproxy-1w", "pinproxy-2w", "nginx", "vllm-router", "python-floor")
# What runs without --targets: the floor is a diagnostic, asked for by name.
DEFAULT_TARGETS = TARGETS[:-1]
MIN_SHARE_OF_NGINX = 0.20
# Issue 14: pinproxy's CPU per request at most twice the Rust router's, same run.
MAX_CPU_VS_VLLM_ROUTER = 2.0
PATH = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class ThroughputConfig:
    duration_s: float = 2.0
    # Closed-loop ceilings are measured in this many rounds, the targets' order flipping
    # each round, so a noisy neighbour lands on every target alike; ratios are per round.
    rounds: int = 1
    warmup_s: float = 0.5
    concurrency: int = 64
    levels: tuple[float, ...] = (0.5, 0.8, 0.95)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    backend: Literal["auto", "sim", "static"] = "auto"
    generator: Literal["auto", "wrk", "builtin"] = "auto"
    store: Literal["redis", "memory"] = "redis"
    sessions: int = 1000
    # Consecutive requests per session id; 1 = each request on the next of `sessions` ids.
    turns: int = 1
    # Each measured run on session ids no earlier run used: its first pass creates pins.
    fresh_sessions: bool = True
    pop_ceiling: bool = True
    proxy_set: tuple[str, ...] = ()  # pinproxy config overrides, section.key=value
    # The tree whose proxy/ package pinproxy runs from (default: BENCH_PROXY_SRC, else
    # this checkout); reported, after checking, as each pinproxy target's proxy_source.
    proxy_src: Path | None = None
    pin: bool = True
    out_root: Path | None = None


@dataclass
class _Target:
    name: str
    url: str
    proc: Proc | None  # None for direct: there is no proxy to account for
    note: str = ""
    source: str | None = None  # pinproxy's proxy/ package directory


def redis_commands(url: str | None) -> int | None:
    """Commands the private Redis has executed so far (``INFO commandstats``, summed):
    its delta over a run, per answer, does not move with the machine's load."""
    if url is None:
        return None
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(v["calls"]) for v in stats.values())


class _Runner:
    def __init__(
        self,
        ctx: RunContext,
        cfg: ThroughputConfig,
        backend: Proc,
        generator: str,
        redis_url: str | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.ctx = ctx
        self.cfg = cfg
        self.backend = backend
        self.generator = generator
        self.raw: dict[str, dict[str, list[float]]] = {}
        self._runs = 0

    def _prefix(self, base: str) -> str:
        """The session-id prefix of the next run: its own when sessions are fresh."""
        self._runs += 1
        return f"{base}{self._runs}-" if self.cfg.fresh_sessions else base

    def closed(self, name: str, url: str, sut: Proc | None, duration_s: float) -> dict[str, Any]:
        port = port_of(url)
        prefix = self._prefix(f"{name}-c-")
        before = self._cpu(sut)
        commands = redis_commands(self.redis_url) if name.startswith("pinproxy") else None
        busy = machine_busy_seconds()
        started = time.monotonic()
        if self.generator == "wrk":
            result = run_wrk(
                url + PATH,
                concurrency=self.cfg.concurrency,
                duration_s=duration_s,
                sessions=self.cfg.sessions,
                prefix=prefix,
                turns=self.cfg.turns,
                cpus=self.ctx.layout.load_cpus,
                taskset=self.ctx.layout.taskset,
            )
        else:
            requests = session_requests(
                "127.0.0.1", port, PATH, self.cfg.sessions, prefix, turns=self.cfg.turns
            )
            result = run_async(
                closed_loop(
                    "127.0.0.1",
                    port,
                    requests,
                    concurrency=self.cfg.concurrency,
                    duration_s=duration_s,
                )
            )
        wall = time.monotonic() - started
        row = self._row(result, before, self._cpu(sut), wall)
        row["machine_busy_cores"] = round((machine_busy_seconds() - busy) / wall, 2)
        row["loadavg_1m"] = round(os.getloadavg()[0], 2)
        if commands is not None:
            after = redis_commands(self.redis_url) or 0
            # INFO itself counts twice a run: noise below a thousandth per request.
            served = max(result.completed, 1)
            row["redis_commands_per_request"] = round((after - commands) / served, 3)
        return row

    def open(
        self, name: str, url: str, sut: Proc | None, rate: float, level: float
    ) -> dict[str, Any]:
        port = port_of(url)
        prefix = self._prefix(f"{name}-o{level}-")
        requests = session_requests(
            "127.0.0.1", port, PATH, self.cfg.sessions, prefix, turns=self.cfg.turns
        )
        before = self._cpu(sut)
        started = time.monotonic()
        result = run_async(
            open_loop("127.0.0.1", port, requests, rate=rate, duration_s=self.cfg.duration_s)
        )
        wall = time.monotonic() - started
        self.raw.setdefault(name, {})[f"{level:g}"] = list(result.latencies)
        return self._row(result, before, self._cpu(sut), wall) | {"level": level}

    def _cpu(self, sut: Proc | None) -> tuple[float, float]:
        return (sut.cpu_seconds() if sut else 0.0, self.backend.cpu_seconds())

    def _row(
        self,
        result: LoadResult,
        before: tuple[float, float],
        after: tuple[float, float],
        wall: float,
    ) -> dict[str, Any]:
        row = result.summary()
        sut_cpu = after[0] - before[0]
        backend_cpu = after[1] - before[1]
        served = max(result.completed, 1)
        row.update(
            {
                "wall_s": round(wall, 3),
                "proxy_cpu_s": round(sut_cpu, 3),
                "proxy_cpu_s_per_1k": round(1000 * sut_cpu / served, 4),
                "proxy_cpu_us_per_request": round(1e6 * sut_cpu / served, 1),
                "proxy_cpu_util": round(sut_cpu / wall, 3) if wall > 0 else None,
                "backend_cpu_util": round(backend_cpu / wall, 3) if wall > 0 else None,
                "generator_cpu_util": round(result.generator_cpu_s / wall, 3) if wall > 0 else None,
            }
        )
        return row


def _start_target(
    ctx: RunContext,
    cfg: ThroughputConfig,
    name: str,
    backend_url: str,
    backend_id: str,
    redis_url: str | None,
) -> _Target | str:
    """Start one target; a string explains why it was skipped."""
    layout = ctx.layout
    if name == "direct":
        return _Target(name, backend_url, None, "the backend itself")
    port = free_port()
    if name == "nginx":
        if find_nginx() is None:
            return "nginx is not installed"
        conf = nginx_proxy_conf(ctx.work, "nginx-proxy", port, backend_url)
        proc = start_nginx(ctx.procs, "nginx-proxy", conf, port, layout.sut_cpus, layout)
        return _Target(
            name,
            f"http://127.0.0.1:{port}",
            proc,
            "nginx, 1 worker, consistent hash on X-Session-ID, keep-alive upstream",
        )
    if name == "vllm-router":
        if find_vllm_router() is None:
            return "vllm-router is not installed (pip install -e '.[bench]')"
        proc = start_vllm_router(ctx.procs, name, port, backend_url, layout.sut_cpus, layout)
        return _Target(
            name, f"http://127.0.0.1:{port}", proc, "vllm-router, consistent_hash on X-Session-ID"
        )
    if name == "python-floor":
        proc = start_python_floor(ctx.procs, name, port, backend_url, layout.sut_cpus, layout)
        return _Target(
            name, f"http://127.0.0.1:{port}", proc,
            "bench/floor_proxy.py: uvloop + httptools relaying bytes, no features",
        )
    workers = 2 if name == "pinproxy-2w" else 1
    if workers > 1 and redis_url is None:
        return "several workers need the Redis store"
    cpus = layout.sut_cpus if workers == 1 else layout.all_cpus
    source = str(proxy_source(cfg.proxy_src))
    proc, _ = start_pinproxy_in_front(
        ctx.procs, layout, (backend_id, "bench", backend_url), redis_url=redis_url,
        tag="tp", proxy_set=cfg.proxy_set, cpus=cpus, port=port, name=name, workers=workers,
        src=cfg.proxy_src,
    )
    note = f"{workers} worker(s) on CPU {cpus}" if cpus else f"{workers} worker(s)"
    return _Target(name, f"http://127.0.0.1:{port}", proc, note, source)


def run(cfg: ThroughputConfig) -> dict[str, Any]:
    unknown = set(cfg.targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown target(s): {', '.join(sorted(unknown))}")
    with run_context("throughput", cfg.out_root, pin=cfg.pin) as ctx:
        layout = ctx.layout
        generator = cfg.generator
        if generator == "auto":
            generator = "wrk" if find_wrk() else "builtin"
        backend_kind = cfg.backend
        if backend_kind == "auto":
            backend_kind = "static" if find_nginx() else "sim"
        redis_url = start_redis(ctx.procs, layout)[1] if cfg.store == "redis" else None
        backend_id = "pop-1"
        if backend_kind == "static":
            port = free_port()
            conf = nginx_static_pop_conf(ctx.work, "static-pop", port, backend_id, "v47")
            backend = start_nginx(ctx.procs, "static-pop", conf, port, layout.load_cpus, layout)
            backend_url = f"http://127.0.0.1:{port}"
        else:
            backend, backend_url = start_sim_pop(
                ctx.procs, PopSpec(backend_id, "bench", "v47"), layout.load_cpus, layout
            )
        runner = _Runner(ctx, cfg, backend, generator, redis_url)
        results: dict[str, Any] = {}
        skipped: dict[str, str] = {}

        pop_ceiling: dict[str, Any] | None = None
        if cfg.pop_ceiling:
            # The sim POP alone on the proxy's core: the most a sim-backed run could reach.
            pop, pop_url = start_sim_pop(
                ctx.procs, PopSpec("pop-ceiling", "bench", "v47"), layout.sut_cpus, layout
            )
            run_async(wait_ready("127.0.0.1", port_of(pop_url)))
            runner.closed("sim-pop", pop_url, pop, cfg.warmup_s)
            pop_ceiling = runner.closed("sim-pop", pop_url, pop, cfg.duration_s)
            ctx.procs.stop(pop)

        live: dict[str, _Target] = {}
        for name in cfg.targets:
            started = _start_target(ctx, cfg, name, backend_url, backend_id, redis_url)
            if isinstance(started, str):
                skipped[name] = started
                continue
            live[name] = started
            run_async(wait_ready("127.0.0.1", port_of(started.url)))
            if cfg.warmup_s > 0:
                runner.closed(name, started.url, started.proc, cfg.warmup_s)
        # Every target is up (the idle ones cost nothing measurable), so the rounds can
        # interleave them: a neighbour's burst then lands on each target alike.
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in live}
        for r in range(max(1, cfg.rounds)):
            order = list(live) if r % 2 == 0 else list(reversed(live))
            for name in order:
                t = live[name]
                row = runner.closed(name, t.url, t.proc, cfg.duration_s)
                rounds[name].append(row | {"round": r})
        for name, t in live.items():
            ceiling = _median_row(rounds[name])
            levels = [
                runner.open(name, t.url, t.proc, level * ceiling["rps"], level)
                for level in cfg.levels
                if ceiling["rps"] > 0
            ]
            rss = t.proc.rss_bytes() if t.proc else 0
            results[name] = {
                "note": t.note,
                **({"proxy_source": t.source} if t.source else {}),
                "ceiling": ceiling,
                "rounds": rounds[name],
                "open_loop": levels,
                "rss_mb": round(rss / 2**20, 1),
            }
        for t in live.values():
            if t.proc is not None:
                ctx.procs.stop(t.proc)
        # Issue 14: how pins stay consistent across workers, shown (not only claimed).
        pins = (check_pins_across_workers(ctx, redis_url, proxy_set=cfg.proxy_set)
                if "pinproxy-2w" in live and redis_url and backend_kind == "static" else None)

        report = _report(ctx, cfg, generator, backend_kind, results, skipped, pop_ceiling)
        report["pins_across_workers"] = pins
        _write(ctx, report, runner.raw)
        return report


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median CPU per request (a real run, not a blend of several);
    for the direct target, which has no proxy CPU, the one with the median rate."""
    key = "rps" if not any(r["proxy_cpu_s"] for r in rows) else "proxy_cpu_us_per_request"
    ranked = sorted(rows, key=lambda r: r[key])
    return ranked[(len(ranked) - 1) // 2]


def _round_ratios(
    results: dict[str, Any], a: str, b: str, key: str = "proxy_cpu_us_per_request"
) -> dict[str, Any] | None:
    """``a``'s value over ``b``'s in each round (the two measured back to back), and the
    median, minimum and maximum of those ratios."""
    if a not in results or b not in results:
        return None
    pairs = zip(results[a]["rounds"], results[b]["rounds"], strict=True)
    per_round = [round(x[key] / y[key], 3) for x, y in pairs if y[key]]
    if not per_round:
        return None
    return {
        "median": round(statistics.median(per_round), 3),
        "min": min(per_round),
        "max": max(per_round),
        "rounds": per_round,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


def _report(
    ctx: RunContext,
    cfg: ThroughputConfig,
    generator: str,
    backend: str,
    results: dict[str, Any],
    skipped: dict[str, str],
    pop_ceiling: dict[str, Any] | None,
) -> dict[str, Any]:
    def rps(name: str) -> float | None:
        return results[name]["ceiling"]["rps"] if name in results else None

    def cpu_us(name: str) -> float | None:
        return results[name]["ceiling"]["proxy_cpu_us_per_request"] if name in results else None

    ratios = {
        "pinproxy-1w/direct": _ratio(rps("pinproxy-1w"), rps("direct")),
        "pinproxy-1w/nginx": _ratio(rps("pinproxy-1w"), rps("nginx")),
        "pinproxy-2w/direct": _ratio(rps("pinproxy-2w"), rps("direct")),
        "pinproxy-2w/nginx": _ratio(rps("pinproxy-2w"), rps("nginx")),
        "cpu_per_request pinproxy-1w/nginx": _ratio(cpu_us("pinproxy-1w"), cpu_us("nginx")),
        "cpu_per_request pinproxy-1w/vllm-router": _ratio(
            cpu_us("pinproxy-1w"), cpu_us("vllm-router")
        ),
        "pinproxy-1w/vllm-router": _ratio(rps("pinproxy-1w"), rps("vllm-router")),
        # What share of nginx's requests/s pinproxy would reach if each had a core to
        # itself: robust when the shared load core, not nginx, capped nginx's ceiling.
        "cpu_normalized_share pinproxy-1w/nginx": _ratio(cpu_us("nginx"), cpu_us("pinproxy-1w")),
    }
    pin_errors = sum(
        run["errors"]
        for name in ("pinproxy-1w", "pinproxy-2w")
        if name in results
        for run in [*results[name]["rounds"], *results[name]["open_loop"]]
    )
    # Each round measures the targets back to back, so the ratio within a round is what
    # a neighbour's load disturbs least; the verdict reads their median.
    per_round = {
        "cpu_per_request pinproxy-1w/vllm-router": _round_ratios(
            results, "pinproxy-1w", "vllm-router"
        ),
        "cpu_per_request pinproxy-1w/nginx": _round_ratios(results, "pinproxy-1w", "nginx"),
        "cpu_per_request vllm-router/nginx": _round_ratios(results, "vllm-router", "nginx"),
        "cpu_per_request pinproxy-1w/python-floor": _round_ratios(
            results, "pinproxy-1w", "python-floor"
        ),
        "cpu_per_request python-floor/vllm-router": _round_ratios(
            results, "python-floor", "vllm-router"
        ),
    }
    share = ratios["pinproxy-1w/nginx"]
    by_round = per_round["cpu_per_request pinproxy-1w/vllm-router"]
    vs_router = by_round["median"] if by_round else None
    targets: dict[str, Any] = {
        "pinproxy_1w_share_of_nginx": {
            "target": MIN_SHARE_OF_NGINX,
            "value": share,
            "ok": None if share is None else share >= MIN_SHARE_OF_NGINX,
        },
        "pinproxy_1w_cpu_normalized_share_of_nginx": {
            "target": MIN_SHARE_OF_NGINX,
            "value": ratios["cpu_normalized_share pinproxy-1w/nginx"],
            "ok": None
            if ratios["cpu_normalized_share pinproxy-1w/nginx"] is None
            else ratios["cpu_normalized_share pinproxy-1w/nginx"] >= MIN_SHARE_OF_NGINX,
        },
        "pinproxy_errors": {"target": 0, "value": pin_errors, "ok": pin_errors == 0},
        "pinproxy_1w_cpu_us_per_request": {
            "target": "reported",
            "value": cpu_us("pinproxy-1w"),
            "ok": None,
        },
        "pinproxy_1w_cpu_vs_vllm_router": {
            "target": MAX_CPU_VS_VLLM_ROUTER,
            "value": vs_router,
            "ok": None if vs_router is None else vs_router <= MAX_CPU_VS_VLLM_ROUTER,
        },
    }
    mock_ok = None
    if pop_ceiling is not None and rps("pinproxy-1w") is not None:
        mock_ok = pop_ceiling["rps"] > (rps("pinproxy-1w") or 0)
    return {
        "scenario": "throughput",
        "out": str(ctx.out),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "command": ctx.command,
        "machine": ctx.facts,
        "layout": ctx.layout.describe(),
        "generator": {"closed_loop": generator, "open_loop": "builtin (constant rate, 1 ms ticks)"},
        "backend": backend,
        "store": cfg.store,
        "sim_pop_ceiling": pop_ceiling,
        "sim_pop_faster_than_pinproxy_1w": mock_ok,
        "results": results,
        "skipped": skipped,
        "ratios": ratios,
        "ratios_per_round": per_round,
        "targets": targets,
    }


def _write(ctx: RunContext, report: dict[str, Any], raw: dict[str, dict[str, list[float]]]) -> None:
    out = ctx.out
    write_json(out / "report.json", report)
    write_json(
        out / "raw.json",
        {
            "unit": "microseconds, open-loop latencies by target and level",
            "data": {
                t: {lvl: as_us(subsample(v, 20_000)) for lvl, v in by.items()}
                for t, by in raw.items()
            },
        },
    )
    results = report["results"]
    levels: Sequence[float] = report["config"]["levels"]
    panels = []
    for level in levels:
        series = {}
        for name in results:
            offered = [r["offered_rps"] for r in results[name]["open_loop"] if r["level"] == level]
            label = f"{name} @ {offered[0]:,.0f}/s" if offered else name
            series[label] = [1000 * v for v in raw.get(name, {}).get(f"{level:g}", [])]
        panels.append((f"offered {level:.0%} of each target's ceiling", series))
    if panels:
        cdf_plot(
            out / "latency-cdf.png",
            panels,
            title="Open-loop latency (from intended send time) at fixed shares of each ceiling",
        )
    names = list(results)
    if names:
        ceilings = [results[n]["ceiling"]["rps"] for n in names]
        bar_plot(
            out / "ceilings.png",
            names,
            ceilings,
            title="Closed-loop ceiling (requests/s)",
            ylabel="requests/s",
        )
        proxies = [n for n in names if n != "direct"]
        if proxies:
            cpu = [results[n]["ceiling"]["proxy_cpu_us_per_request"] for n in proxies]
            bar_plot(
                out / "cpu-per-request.png",
                proxies,
                cpu,
                title="Proxy CPU time per proxied request (µs, at the ceiling)",
                ylabel="CPU µs per request",
                annotations=[f"{v:.0f} µs" for v in cpu],
            )
    (out / "summary.md").write_text(_markdown(report))


def _markdown(report: dict[str, Any]) -> str:
    md = md_header("Throughput", report["machine"], report["layout"], report["command"])
    gen = report["generator"]
    md += (
        f"Backend: **{report['backend']}** POP; pins in **{report['store']}**; closed loop: "
        f"**{gen['closed_loop']}** with {report['config']['concurrency']} connections; open loop: "
        f"{gen['open_loop']}; {report['config']['duration_s']} s per run. Sessions: "
        f"{report['config']['sessions']:,} ids, {report['config']['turns']} consecutive "
        "request(s) per id, "
        + (
            "each run on ids of its own (its first pass creates the pins)"
            if report["config"]["fresh_sessions"]
            else "the same ids in every run (after the warm-up, cache hits only)"
        )
        + ".\n\n"
    )
    rows = []
    for name, res in report["results"].items():
        for run in [*res["rounds"], *res["open_loop"]]:
            lat = run["latency"]
            if run["mode"] == "closed":
                label = f"closed, round {run['round'] + 1}"
                label += " (median)" if run == res["ceiling"] else ""
            else:
                label = f"open {run['level']:.0%}"
            if run.get("generator_limited"):
                label += " ⚠ generator-limited"
            rows.append(
                [
                    name,
                    label,
                    run["offered_rps"],
                    run["rps"],
                    lat.get("p50_ms"),
                    lat.get("p99_ms"),
                    run["errors"],
                    run["proxy_cpu_us_per_request"] if name != "direct" else None,
                    run["proxy_cpu_util"] if name != "direct" else None,
                    run["backend_cpu_util"],
                    run["generator_cpu_util"],
                    run.get("machine_busy_cores"),
                    run.get("redis_commands_per_request"),
                ]
            )
    md += table(
        [
            "target",
            "run",
            "offered/s",
            "req/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "proxy CPU µs/req",
            "proxy core util",
            "backend util",
            "generator util",
            "machine busy cores",
            "Redis cmds/req",
        ],
        rows,
    )
    md += (
        '\n\n"proxy core util" near 1.0 means the proxy was the bottleneck; when it is well '
        "below, the load side (generator + backend on the shared core) was. Rows marked "
        "generator-limited fell behind their schedule by > 5 ms at p99. "
        '"machine busy cores": every core\'s busy time over the run\'s wall time, other '
        "tenants included (2.0 = a 2-core machine fully busy).\n\n"
    )
    errors = [f"{name} {run.get('level', 'closed')}: {run['error_reasons']}"
              for name, res in report["results"].items()
              for run in [*res["rounds"], *res["open_loop"]] if run["error_reasons"]]
    md += ("Errors by kind (status, code, shed reason): " + "; ".join(errors)
           if errors else "Errors by kind: none") + "\n\n"
    pins = report.get("pins_across_workers")
    if pins is not None:
        md += (f"Pins across 2 workers (bench/worker_pins.py): {pins['sessions']} sessions x "
               f"{pins['requests'] // pins['sessions']} requests, a connection each: "
               f"{pins['sessions_answered_by_two_versions']} answered by two versions, "
               f"{pins['sessions_with_an_error']} with an error, {pins['pins_in_redis']} pins "
               f"in Redis, sessions by version {pins['sessions_by_version']}, worker CPU s "
               f"{pins['worker_cpu_s']}: consistent = **{pins['consistent']}**\n\n")
    if report["skipped"]:
        md += "Skipped: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items()) + "\n\n"
    pc = report["sim_pop_ceiling"]
    if pc is not None:
        md += (
            f"Simulated POP alone on the proxy's core: **{pc['rps']:,.0f} req/s** "
            f"(p99 {pc['latency'].get('p99_ms')} ms); faster than pinproxy with one worker: "
            f"{report['sim_pop_faster_than_pinproxy_1w']}.\n\n"
        )
    md += "Ratios: " + ", ".join(f"{k} = {fmt(v, 3)}" for k, v in report["ratios"].items()) + "\n\n"
    for key, value in report["ratios_per_round"].items():
        if value is not None:
            md += (
                f"- {key}, per round (back to back): median **{value['median']:.2f}** "
                f"[{value['min']:.2f}, {value['max']:.2f}] over {len(value['rounds'])} round(s)\n"
            )
    md += "\n"
    t = report["targets"]
    md += table(
        ["target", "goal", "measured", "verdict"],
        [
            [
                "pinproxy 1 worker req/s vs nginx",
                f"≥ {MIN_SHARE_OF_NGINX:.0%}",
                fmt(t["pinproxy_1w_share_of_nginx"]["value"], 3),
                verdict(t["pinproxy_1w_share_of_nginx"]["ok"]),
            ],
            [
                "same, CPU-normalized (nginx µs/req ÷ pinproxy µs/req)",
                f"≥ {MIN_SHARE_OF_NGINX:.0%}",
                fmt(t["pinproxy_1w_cpu_normalized_share_of_nginx"]["value"], 3),
                verdict(t["pinproxy_1w_cpu_normalized_share_of_nginx"]["ok"]),
            ],
            [
                "pinproxy errors",
                "0",
                t["pinproxy_errors"]["value"],
                verdict(t["pinproxy_errors"]["ok"]),
            ],
            [
                "pinproxy CPU µs/request",
                t["pinproxy_1w_cpu_us_per_request"]["target"],
                fmt(t["pinproxy_1w_cpu_us_per_request"]["value"], 1),
                "reported",
            ],
            [
                "pinproxy 1 worker CPU per request ÷ vllm-router's",
                f"≤ {MAX_CPU_VS_VLLM_ROUTER:g}",
                fmt(t["pinproxy_1w_cpu_vs_vllm_router"]["value"], 2),
                verdict(t["pinproxy_1w_cpu_vs_vllm_router"]["ok"]),
            ],
        ],
    )
    md += (
        "\n\n![latency CDFs](latency-cdf.png)\n\n![ceilings](ceilings.png)\n\n"
        "![CPU per request](cpu-per-request.png)\n"
    )
    return md
