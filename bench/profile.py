"""Scenario ``profile``: where pinproxy's CPU goes on the request path.

pinproxy (one worker, Redis pins) runs on the proxy's core in front of the fast
backend while a closed-loop load saturates it; ``py-spy record`` samples the live
process (no code change, no restart) and the raw stacks are folded into "own" and
"inclusive" tables: own time says which function burns the CPU, inclusive time which
part of the request path it is spent under.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from bench.common import port_of, run_async, run_context, wait_ready
from bench.httpload import closed_loop, find_wrk, run_wrk, session_requests
from bench.procs import (
    PopSpec,
    find_nginx,
    free_port,
    nginx_static_pop_conf,
    start_nginx,
    start_pinproxy_in_front,
    start_redis,
    start_sim_pop,
)
from bench.report import bar_plot, md_header, write_json
from bench.stats import table

PATH = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    duration_s: float = 10.0
    rate_hz: int = 250
    concurrency: int = 32
    store: Literal["redis", "memory"] = "redis"
    # Consecutive requests per session id (1: every request on the next of 1,000 ids,
    # so the first pass creates a pin per request; 8: mostly cache hits).
    turns: int = 1
    top: int = 30
    proxy_set: tuple[str, ...] = ()  # pinproxy config overrides, section.key=value
    pin: bool = True
    out_root: Path | None = None


def find_py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def fold(raw: str) -> tuple[int, Counter[str], Counter[str]]:
    """(samples, own, inclusive) from py-spy's raw (collapsed-stack) output."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    return total, own, incl


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py:123)"; the line keeps it findable.
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def run(cfg: ProfileConfig) -> dict[str, Any]:
    spy = find_py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    with run_context("profile", cfg.out_root, pin=cfg.pin) as ctx:
        layout = ctx.layout
        redis_url = start_redis(ctx.procs, layout)[1] if cfg.store == "redis" else None
        port = free_port()
        if find_nginx():
            conf = nginx_static_pop_conf(ctx.work, "static-pop", port, "pop-1", "v47")
            start_nginx(ctx.procs, "static-pop", conf, port, layout.load_cpus, layout)
            backend, backend_url = "static", f"http://127.0.0.1:{port}"
        else:
            _, backend_url = start_sim_pop(
                ctx.procs, PopSpec("pop-1", "bench", "v47"), layout.load_cpus, layout
            )
            backend = "sim"
        proxy, pport = start_pinproxy_in_front(
            ctx.procs, layout, ("pop-1", "bench", backend_url), redis_url=redis_url,
            tag="prof", proxy_set=cfg.proxy_set, cpus=layout.sut_cpus,
        )
        url = f"http://127.0.0.1:{pport}"
        run_async(wait_ready("127.0.0.1", pport))
        raw_path = ctx.out / "py-spy.raw.txt"
        load: dict[str, Any] = {}

        def drive() -> None:
            # The load outlasts the sampling window on both ends.
            seconds = cfg.duration_s + 2
            if find_wrk():
                res = run_wrk(
                    url + PATH,
                    concurrency=cfg.concurrency,
                    duration_s=seconds,
                    sessions=1000,
                    prefix="prof-",
                    turns=cfg.turns,
                    cpus=layout.load_cpus,
                    taskset=layout.taskset,
                )
            else:
                reqs = session_requests(
                    "127.0.0.1", port_of(url), PATH, 1000, "prof-", turns=cfg.turns
                )
                res = run_async(
                    closed_loop(
                        "127.0.0.1",
                        port_of(url),
                        reqs,
                        concurrency=cfg.concurrency,
                        duration_s=seconds,
                    )
                )
            load.update(res.summary())

        thread = threading.Thread(target=drive, name="bench-profile-load")
        thread.start()
        try:
            cpu0 = proxy.cpu_seconds()

            def spy_cmd(fmt: str, out: Path) -> list[str]:
                return [
                    spy, "record", "-p", str(proxy.pid), "-d", str(int(cfg.duration_s)),
                    "-r", str(cfg.rate_hz), "-f", fmt, "-o", str(out), "--nonblocking",
                ]

            # A second sampler writes the flame graph (SVG) over the same window; both
            # read the process's memory from outside, so the proxy pays for neither.
            flame = subprocess.Popen(
                spy_cmd("flamegraph", ctx.out / "flamegraph.svg"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                subprocess.run(
                    spy_cmd("raw", raw_path),
                    capture_output=True,
                    timeout=cfg.duration_s + 60,
                    check=True,
                )
            finally:
                flame.wait(cfg.duration_s + 60)
            cpu = proxy.cpu_seconds() - cpu0
        finally:
            thread.join(cfg.duration_s + 60)
        total, own, incl = fold(raw_path.read_text())
        report = {
            "scenario": "profile",
            "out": str(ctx.out),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "command": ctx.command,
            "machine": ctx.facts,
            "layout": layout.describe(),
            "backend": backend,
            "load": load,
            "proxy_cpu_s_while_sampled": round(cpu, 2),
            "cpu_us_per_request": round(1e6 * cpu / max(1, load.get("rps", 0) * cfg.duration_s), 1),
            "samples": total,
            "own": [[_short(f), round(100 * n / total, 2)] for f, n in own.most_common(cfg.top)],
            "inclusive": [
                [_short(f), round(100 * n / total, 2)] for f, n in incl.most_common(cfg.top * 2)
            ],
            "targets": {},
        }
        write_json(ctx.out / "report.json", report)
        ours = [
            (f, p)
            for f, p in report["inclusive"]
            if "(" in f
            and any(
                m in f
                for m in (
                    "dataplane.py",
                    "headers.py",
                    "sessions.py",
                    "upstream.py",
                    "routing.py",
                    "registry.py",
                    "redis.py",
                    "telemetry",
                    "metrics.py",
                    "audit.py",
                    "traffic.py",
                    "events.py",
                    "requestlog.py",
                    "tracing.py",
                    "usage.py",
                    "ewma.py",
                    "cache.py",
                )
            )
        ][:14]
        if ours:
            bar_plot(
                ctx.out / "inclusive.png",
                [f.split(" (")[0][-28:] for f, _ in ours],
                [p for _, p in ours],
                title="pinproxy functions: inclusive share of samples (%)",
                ylabel="% of samples",
                annotations=[f"{p:.1f}%" for _, p in ours],
            )
        md = md_header("Profile of pinproxy under load", ctx.facts, report["layout"], ctx.command)
        md += (
            f"py-spy at {cfg.rate_hz} Hz for {cfg.duration_s} s, {total} samples, backend "
            f"{backend}, load: {load.get('rps')} req/s, proxy CPU {report['cpu_us_per_request']} "
            f"µs/request.\n\n## Own time\n\n"
        )
        md += table(["function", "% samples"], report["own"]) + "\n\n## Inclusive time\n\n"
        md += (
            table(["function", "% samples"], report["inclusive"])
            + "\n\n![inclusive](inclusive.png)\n"
        )
        (ctx.out / "summary.md").write_text(md)
        return report
