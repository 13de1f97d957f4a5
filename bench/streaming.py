"""Scenario ``streaming``: many concurrent SSE streams with paced tokens.

For each stream count N, N chat-completion streams start evenly over ``ramp_s`` (each
on its own connection, as N users would) and each lasts ``completion_tokens /
tokens_per_second`` seconds, so all N are open at once at the end of the ramp. The
same run goes direct to the simulated POP and through pinproxy. Time to first token
counts from the stream's scheduled start (connect included); inter-chunk gaps are the
times between successive arrivals of token data on one stream. The proxy's RSS is
sampled throughout: growth from before the run to the peak, per 1,000 streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from bench.common import RunContext, port_of, run_async, run_context, wait_ready
from bench.httpload import HttpConn, build_request
from bench.procs import (
    PopSpec,
    Proc,
    start_pinproxy_in_front,
    start_redis,
    start_sim_pop,
)
from bench.report import cdf_plot, histogram_plot, md_header, verdict, write_json
from bench.stats import as_us, fmt, subsample, summarize_ms, table

TARGET_ADDED_TTFT_P99_MS = 5.0
TARGET_RSS_MB_PER_1K = 50.0
PATH = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class StreamingConfig:
    streams: tuple[int, ...] = (100, 1000, 2000)
    tokens_per_second: float = 2.0
    completion_tokens: int = 6
    ramp_s: float = 3.0
    ttfb_ms: float = 5.0
    store: Literal["redis", "memory"] = "redis"
    proxy_set: tuple[str, ...] = ()  # pinproxy config overrides, section.key=value
    pin: bool = True
    out_root: Path | None = None


@dataclass
class _Stream:
    start: float  # scheduled start (perf_counter)
    first: float | None = None
    last: float | None = None
    gaps: list[float] = field(default_factory=list)
    frames: int = 0
    done: bool = False
    status: int = 0
    error: str | None = None
    tail: bytes = b""


@dataclass
class _SideResult:
    ttft: list[float]
    gaps: list[float]
    completed: int
    failed: dict[str, int]
    wall_s: float
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    proxy_cpu_s: float = 0.0


async def _run_streams(
    port: int, n: int, cfg: StreamingConfig, tag: str, proxy: Proc | None
) -> _SideResult:
    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    streams: list[_Stream] = []
    conns: list[HttpConn] = []
    finished = asyncio.Event()
    state = {"open": n}
    body = orjson.dumps(
        {"model": "sim", "stream": True, "messages": [{"role": "user", "content": "stream please"}]}
    )

    def settle(s: _Stream) -> None:
        state["open"] -= 1
        if state["open"] == 0:
            finished.set()

    def make(s: _Stream) -> HttpConn:
        def on_body(conn: HttpConn, data: bytes, now: float) -> None:
            if s.first is None:
                s.first = now
            else:
                assert s.last is not None
                s.gaps.append(now - s.last)
            s.last = now
            s.frames += data.count(b"data: ")
            s.tail = (s.tail + data)[-64:]

        def on_done(conn: HttpConn, status: int, now: float) -> None:
            s.status = status
            if status != 200:
                s.error = f"status_{status}"
            elif b"[DONE]" not in s.tail:
                s.error = "no_done_marker"
            s.done = True
            conn.close()
            settle(s)

        def on_lost(conn: HttpConn, exc: Exception | None) -> None:
            if not s.done:
                s.error = "connection_lost"
                s.done = True
                settle(s)

        return HttpConn(on_done, on_lost, on_body)

    async def start(i: int, s: _Stream) -> None:
        try:
            _, conn = await loop.create_connection(lambda: make(s), "127.0.0.1", port)
        except OSError as exc:
            s.error = f"connect_failed:{type(exc).__name__}"
            s.done = True
            settle(s)
            return
        conns.append(conn)
        conn.send(build_request("127.0.0.1", port, PATH, body=body, session_id=f"{tag}-{i}"))

    rss_before = proxy.rss_bytes() if proxy else 0
    cpu_before = proxy.cpu_seconds() if proxy else 0.0
    peak = rss_before
    t0 = clock() + 0.05
    tasks: list[asyncio.Task[None]] = []
    for i in range(n):
        s = _Stream(start=t0 + cfg.ramp_s * i / n)
        streams.append(s)

        def launch(i: int = i, s: _Stream = s) -> None:
            tasks.append(loop.create_task(start(i, s)))

        loop.call_at(loop.time() + (s.start - clock()), launch)
    stream_s = cfg.completion_tokens / cfg.tokens_per_second if cfg.tokens_per_second else 0.0
    deadline = cfg.ramp_s + stream_s + 30.0
    started = clock()
    try:
        while not finished.is_set() and clock() - started < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), 0.1)
            if proxy:
                peak = max(peak, proxy.rss_bytes())
    finally:
        for conn in conns:
            conn.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    wall = clock() - started
    failed: dict[str, int] = {}
    for s in streams:
        if not s.done:
            s.error = "timeout"
        if s.error:
            failed[s.error] = failed.get(s.error, 0) + 1
    ok = [s for s in streams if s.error is None]
    await asyncio.sleep(0.2)  # let the proxy release what the streams held
    return _SideResult(
        ttft=[s.first - s.start for s in ok if s.first is not None],
        gaps=[g for s in ok for g in s.gaps],
        completed=len(ok),
        failed=failed,
        wall_s=wall,
        rss_before=rss_before,
        rss_peak=peak,
        rss_after=proxy.rss_bytes() if proxy else 0,
        proxy_cpu_s=proxy.cpu_seconds() - cpu_before if proxy else 0.0,
    )


def run(cfg: StreamingConfig) -> dict[str, Any]:
    with run_context("streaming", cfg.out_root, pin=cfg.pin) as ctx:
        layout = ctx.layout
        redis_url = start_redis(ctx.procs, layout)[1] if cfg.store == "redis" else None
        spec = PopSpec(
            "pop-1",
            "us-east",
            "v47",
            ttfb_ms=cfg.ttfb_ms,
            tokens_per_second=cfg.tokens_per_second,
            completion_tokens=cfg.completion_tokens,
        )
        _, pop_url = start_sim_pop(ctx.procs, spec, layout.load_cpus, layout)
        proxy, port = start_pinproxy_in_front(
            ctx.procs, layout, ("pop-1", "us-east", pop_url), redis_url=redis_url,
            tag="st", proxy_set=cfg.proxy_set, cpus=layout.sut_cpus,
        )

        async def measure() -> dict[int, dict[str, _SideResult]]:
            await wait_ready("127.0.0.1", port)
            out: dict[int, dict[str, _SideResult]] = {}
            # A short warm-up so neither side pays for first-time imports and pools.
            await _run_streams(port_of(pop_url), 20, _quick(cfg), "warm-d", None)
            await _run_streams(port, 20, _quick(cfg), "warm-p", proxy)
            # Growth is measured from before the first level: memory a level leaves
            # behind is not handed back to the OS, so a per-level baseline would hide it.
            baseline = proxy.rss_bytes()
            for n in cfg.streams:
                direct = await _run_streams(port_of(pop_url), n, cfg, f"d{n}", None)
                proxied = await _run_streams(port, n, cfg, f"p{n}", proxy)
                proxied.rss_before = baseline
                out[n] = {"direct": direct, "proxy": proxied}
            return out

        measured = run_async(measure())
        report = _report(ctx, cfg, measured)
        _write(ctx, report, measured)
        return report


def _quick(cfg: StreamingConfig) -> StreamingConfig:
    return StreamingConfig(
        streams=(20,),
        tokens_per_second=cfg.tokens_per_second,
        completion_tokens=cfg.completion_tokens,
        ramp_s=0.2,
    )


def _report(
    ctx: RunContext, cfg: StreamingConfig, m: dict[int, dict[str, _SideResult]]
) -> dict[str, Any]:
    levels: list[dict[str, Any]] = []
    for n, sides in m.items():
        d, p = sides["direct"], sides["proxy"]
        ttft_d, ttft_p = summarize_ms(d.ttft), summarize_ms(p.ttft)
        gap_d, gap_p = summarize_ms(d.gaps), summarize_ms(p.gaps)
        growth = max(0, p.rss_peak - p.rss_before)
        levels.append(
            {
                "streams": n,
                "direct": {
                    "ttft": ttft_d,
                    "inter_chunk": gap_d,
                    "completed": d.completed,
                    "failed": d.failed,
                    "wall_s": round(d.wall_s, 2),
                },
                "proxy": {
                    "ttft": ttft_p,
                    "inter_chunk": gap_p,
                    "completed": p.completed,
                    "failed": p.failed,
                    "wall_s": round(p.wall_s, 2),
                    "proxy_cpu_util": round(p.proxy_cpu_s / p.wall_s, 3) if p.wall_s else None,
                },
                "added_ttft_p50_ms": _diff(ttft_p, ttft_d, "p50_ms"),
                "added_ttft_p99_ms": _diff(ttft_p, ttft_d, "p99_ms"),
                "added_inter_chunk_p99_ms": _diff(gap_p, gap_d, "p99_ms"),
                "streams_lost": n - p.completed,
                "proxy_rss_mb": {
                    "before": round(p.rss_before / 2**20, 1),
                    "peak": round(p.rss_peak / 2**20, 1),
                    "after": round(p.rss_after / 2**20, 1),
                },
                "proxy_rss_growth_mb_per_1k_streams": round(growth / 2**20 / n * 1000, 2),
            }
        )
    top = max(levels, key=lambda lv: lv["streams"]) if levels else None
    targets: dict[str, Any] = {}
    if top is not None:
        added = top["added_ttft_p99_ms"]
        lost = sum(lv["streams_lost"] for lv in levels)
        rss = top["proxy_rss_growth_mb_per_1k_streams"]
        targets = {
            "added_ttft_p99_ms": {
                "target": TARGET_ADDED_TTFT_P99_MS,
                "value": added,
                "at_streams": top["streams"],
                "ok": added is not None and added <= TARGET_ADDED_TTFT_P99_MS,
            },
            "streams_lost": {"target": 0, "value": lost, "ok": lost == 0},
            "rss_mb_per_1k_streams": {
                "target": TARGET_RSS_MB_PER_1K,
                "value": rss,
                "ok": rss < TARGET_RSS_MB_PER_1K,
            },
        }
    return {
        "scenario": "streaming",
        "out": str(ctx.out),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "command": ctx.command,
        "machine": ctx.facts,
        "layout": ctx.layout.describe(),
        "client": "builtin raw HTTP/1.1 client, one connection per stream",
        "levels": levels,
        "targets": targets,
    }


def _diff(a: dict[str, float], b: dict[str, float], key: str) -> float | None:
    if key not in a or key not in b:
        return None
    return round(a[key] - b[key], 3)


def _write(ctx: RunContext, report: dict[str, Any], m: dict[int, dict[str, _SideResult]]) -> None:
    out = ctx.out
    write_json(out / "report.json", report)
    write_json(
        out / "raw.json",
        {
            "unit": "microseconds",
            "ttft": {
                str(n): {side: as_us(r.ttft) for side, r in sides.items()} for n, sides in m.items()
            },
        },
    )
    panels = [
        (
            f"{n} concurrent streams",
            {
                "direct": [1000 * v for v in sides["direct"].ttft],
                "pinproxy": [1000 * v for v in sides["proxy"].ttft],
            },
        )
        for n, sides in m.items()
    ]
    if panels:
        cdf_plot(
            out / "ttft-cdf.png",
            panels,
            title="Time to first token: direct vs through pinproxy",
            xlabel="time to first token (ms)",
        )
        n_top = max(m)
        histogram_plot(
            out / "ttft-hist.png",
            {
                "direct": [1000 * v for v in m[n_top]["direct"].ttft],
                "pinproxy": [1000 * v for v in m[n_top]["proxy"].ttft],
            },
            title=f"TTFT distribution at {n_top} concurrent streams",
            xlabel="time to first token (ms)",
        )
        gaps = [
            (
                f"{n} streams",
                {
                    "direct": [1000 * v for v in subsample(s["direct"].gaps, 50_000)],
                    "pinproxy": [1000 * v for v in subsample(s["proxy"].gaps, 50_000)],
                },
            )
            for n, s in m.items()
        ]
        cdf_plot(
            out / "inter-chunk-cdf.png",
            gaps,
            xlabel="gap between chunks (ms)",
            title="Inter-chunk gaps (tokens paced by the POP)",
        )
    cfg = report["config"]
    md = md_header("Streaming", report["machine"], report["layout"], report["command"])
    md += (
        f"Tokens paced at {cfg['tokens_per_second']}/s, {cfg['completion_tokens']} per stream; "
        f"streams start evenly over {cfg['ramp_s']} s, so all are open at once at the end of "
        f"the ramp; POP TTFB {cfg['ttfb_ms']} ms; pins in {cfg['store']}.\n\n"
    )
    rows = []
    for lv in report["levels"]:
        rows.append(
            [
                lv["streams"],
                lv["direct"]["ttft"].get("p50_ms"),
                lv["proxy"]["ttft"].get("p50_ms"),
                lv["direct"]["ttft"].get("p99_ms"),
                lv["proxy"]["ttft"].get("p99_ms"),
                lv["added_ttft_p99_ms"],
                lv["direct"]["inter_chunk"].get("p99_ms"),
                lv["proxy"]["inter_chunk"].get("p99_ms"),
                f"{lv['proxy']['completed']}/{lv['streams']}",
                lv["proxy_rss_mb"]["before"],
                lv["proxy_rss_mb"]["peak"],
                lv["proxy_rss_growth_mb_per_1k_streams"],
                lv["proxy"]["proxy_cpu_util"],
            ]
        )
    md += table(
        [
            "streams",
            "TTFT p50 direct",
            "TTFT p50 proxy",
            "TTFT p99 direct",
            "TTFT p99 proxy",
            "added TTFT p99",
            "gap p99 direct",
            "gap p99 proxy",
            "completed (proxy)",
            "RSS at start MB",
            "RSS peak MB",
            "MB per 1k streams",
            "proxy core util",
        ],
        rows,
    )
    md += (
        "\n\nAll times in ms. RSS growth is from before the first level to this level's peak. "
        "A proxy core utilisation near 1.0 means the proxy was saturated. "
    )
    fails = {
        lv["streams"]: (lv["direct"]["failed"], lv["proxy"]["failed"])
        for lv in report["levels"]
        if lv["direct"]["failed"] or lv["proxy"]["failed"]
    }
    md += f"Failed streams (direct, proxy): {fails}\n\n" if fails else "No stream failed.\n\n"
    t = report["targets"]
    if t:
        md += table(
            ["target", "goal", "measured", "verdict"],
            [
                [
                    f"added TTFT p99 at {t['added_ttft_p99_ms']['at_streams']} streams",
                    f"≤ {TARGET_ADDED_TTFT_P99_MS} ms",
                    fmt(t["added_ttft_p99_ms"]["value"], 2),
                    verdict(t["added_ttft_p99_ms"]["ok"]),
                ],
                [
                    "streams lost (all levels)",
                    "0",
                    t["streams_lost"]["value"],
                    verdict(t["streams_lost"]["ok"]),
                ],
                [
                    "proxy RSS growth per 1,000 streams",
                    f"< {TARGET_RSS_MB_PER_1K} MB",
                    fmt(t["rss_mb_per_1k_streams"]["value"], 2),
                    verdict(t["rss_mb_per_1k_streams"]["ok"]),
                ],
            ],
        )
    md += (
        "\n\n![TTFT CDF](ttft-cdf.png)\n\n![TTFT histogram](ttft-hist.png)\n\n"
        "![inter-chunk gaps](inter-chunk-cdf.png)\n"
    )
    (out / "summary.md").write_text(md)
