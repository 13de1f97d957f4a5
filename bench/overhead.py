"""Scenario ``overhead``: the latency pinproxy adds at concurrency 1.

One simulated POP is hit directly and through pinproxy in interleaved rounds (the
order flips each round, so a drift in machine load hits both sides alike). Each
round yields p50/p90/p99 for both and their difference; the report gives the median
over rounds with the spread. Sessions have ``turns`` requests each, so one request in
``turns`` creates a pin (an atomic SET NX round trip to Redis) and the others hit the
proxy's local pin cache, as a conversation does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from bench.common import RunContext, port_of, run_async, run_context, wait_ready
from bench.httpload import SerialClient, build_request
from bench.procs import (
    PopSpec,
    Proc,
    start_pinproxy_in_front,
    start_redis,
    start_sim_pop,
)
from bench.report import _pyplot, cdf_plot, md_header, verdict, write_json
from bench.stats import as_us, fmt, median_spread, subsample, summarize_ms, table

TARGET_ADDED_P50_MS = 0.5
TARGET_ADDED_P99_MS = 1.5
_PS = ("p50", "p90", "p99")


@dataclass(frozen=True, slots=True)
class OverheadConfig:
    rounds: int = 10
    requests: int = 300  # per round and side
    warmup: int = 300
    turns: int = 8  # requests per session: 1 in ``turns`` creates a pin
    store: Literal["redis", "memory"] = "redis"
    ttfb_ms: float = 0.0
    proxy_set: tuple[str, ...] = ()  # pinproxy config overrides, section.key=value
    pin: bool = True
    out_root: Path | None = None


async def _measure(
    ctx: RunContext, cfg: OverheadConfig, pop_url: str, proxy_port: int, proxy: Proc
) -> dict[str, Any]:
    pop_port = port_of(pop_url)
    host = "127.0.0.1"
    await wait_ready(host, proxy_port)
    sides = {"direct": SerialClient(host, pop_port), "proxy": SerialClient(host, proxy_port)}
    samples: dict[str, list[float]] = {"direct": [], "proxy": []}
    rounds: list[dict[str, Any]] = []
    errors: dict[str, int] = {"direct": 0, "proxy": 0}
    try:
        for name, client in sides.items():
            port = pop_port if name == "direct" else proxy_port
            for i in range(cfg.warmup):
                await client.request(
                    build_request(
                        host, port, "/v1/chat/completions", session_id=f"warm-{i // cfg.turns}"
                    )
                )
        cpu_before = proxy.cpu_seconds()
        for r in range(cfg.rounds):
            order = ["direct", "proxy"] if r % 2 == 0 else ["proxy", "direct"]
            per_side: dict[str, list[float]] = {}
            for name in order:
                port = pop_port if name == "direct" else proxy_port
                client = sides[name]
                got: list[float] = []
                for i in range(cfg.requests):
                    request = build_request(
                        host, port, "/v1/chat/completions", session_id=f"ovh-{r}-{i // cfg.turns}"
                    )
                    status, seconds = await client.request(request)
                    if status == 200:
                        got.append(seconds)
                    else:
                        errors[name] += 1
                per_side[name] = got
                samples[name].extend(got)
            d = summarize_ms(per_side["direct"])
            p = summarize_ms(per_side["proxy"])
            rounds.append(
                {
                    "round": r,
                    "order": order,
                    "direct": {k: d.get(f"{k}_ms") for k in _PS},
                    "proxy": {k: p.get(f"{k}_ms") for k in _PS},
                    "added": {
                        k: round(p[f"{k}_ms"] - d[f"{k}_ms"], 4)
                        if f"{k}_ms" in p and f"{k}_ms" in d
                        else None
                        for k in _PS
                    },
                }
            )
    finally:
        for client in sides.values():
            client.close()
    # Everything the proxy spent during the rounds (the direct side's turns included,
    # when it should be idle) per request it served: its cost at concurrency 1.
    cpu_us = 1e6 * (proxy.cpu_seconds() - cpu_before) / max(1, cfg.rounds * cfg.requests)
    return {"rounds": rounds, "samples": samples, "errors": errors, "proxy_cpu_us": cpu_us}


def run(cfg: OverheadConfig) -> dict[str, Any]:
    with run_context("overhead", cfg.out_root, pin=cfg.pin) as ctx:
        layout = ctx.layout
        redis_url = None
        if cfg.store == "redis":
            _, redis_url = start_redis(ctx.procs, layout)
        _, pop_url = start_sim_pop(
            ctx.procs,
            PopSpec("pop-1", "us-east", "v47", ttfb_ms=cfg.ttfb_ms),
            layout.load_cpus,
            layout,
        )
        proxy, port = start_pinproxy_in_front(
            ctx.procs, layout, ("pop-1", "us-east", pop_url), redis_url=redis_url,
            tag="ovh", proxy_set=cfg.proxy_set, cpus=layout.sut_cpus,
        )
        measured = run_async(_measure(ctx, cfg, pop_url, port, proxy))
        proxy_rss = proxy.rss_bytes()
        report = _report(ctx, cfg, measured, proxy_rss)
        _write(ctx, report, measured)
        return report


def _report(ctx: RunContext, cfg: OverheadConfig, m: dict[str, Any], rss: int) -> dict[str, Any]:
    rounds = m["rounds"]
    summary: dict[str, dict[str, Any]] = {}
    for side in ("direct", "proxy", "added"):
        summary[side] = {
            f"{k}_ms": median_spread([r[side][k] for r in rounds if r[side][k] is not None])
            for k in _PS
        }
    added_p50 = summary["added"]["p50_ms"]["median"]
    added_p99 = summary["added"]["p99_ms"]["median"]
    return {
        "scenario": "overhead",
        "out": str(ctx.out),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "command": ctx.command,
        "machine": ctx.facts,
        "layout": ctx.layout.describe(),
        "client": "builtin raw HTTP/1.1 client, one keep-alive connection per side",
        "store": cfg.store,
        "rounds": rounds,
        "pooled": {
            "direct": summarize_ms(m["samples"]["direct"]),
            "proxy": summarize_ms(m["samples"]["proxy"]),
        },
        "summary": summary,
        "errors": m["errors"],
        "proxy_rss_mb": round(rss / 2**20, 1),
        "proxy_cpu_us_per_request": round(m["proxy_cpu_us"], 1),
        "targets": {
            "added_p50_ms": {
                "target": TARGET_ADDED_P50_MS,
                "value": added_p50,
                "ok": added_p50 <= TARGET_ADDED_P50_MS,
            },
            "added_p99_ms": {
                "target": TARGET_ADDED_P99_MS,
                "value": added_p99,
                "ok": added_p99 <= TARGET_ADDED_P99_MS,
            },
            "errors": {
                "target": 0,
                "value": sum(m["errors"].values()),
                "ok": sum(m["errors"].values()) == 0,
            },
        },
    }


def _write(ctx: RunContext, report: dict[str, Any], m: dict[str, Any]) -> None:
    out = ctx.out
    write_json(out / "report.json", report)
    write_json(
        out / "raw.json",
        {side: as_us(subsample(v, 50_000)) for side, v in m["samples"].items()}
        | {"unit": "microseconds"},
    )
    ms = {side: [1000 * v for v in vals] for side, vals in m["samples"].items()}
    cdf_plot(
        out / "latency-cdf.png",
        [("all rounds pooled", {"direct": ms["direct"], "pinproxy": ms["proxy"]})],
        title=f"Concurrency 1: sim POP direct vs through pinproxy ({report['store']} pins)",
    )
    _rounds_plot(out / "added-by-round.png", report)
    s = report["summary"]
    rows = [
        [side]
        + [
            f"{fmt(s[side][f'{k}_ms']['median'], 3)} "
            f"[{fmt(s[side][f'{k}_ms']['min'], 3)}, {fmt(s[side][f'{k}_ms']['max'], 3)}]"
            for k in _PS
        ]
        for side in ("direct", "proxy", "added")
    ]
    t = report["targets"]
    cfg = report["config"]
    md = md_header(
        "Overhead at concurrency 1", report["machine"], report["layout"], report["command"]
    )
    md += (
        f"{cfg['rounds']} interleaved rounds x {cfg['requests']} requests per side; sessions of "
        f"{cfg['turns']} turns; pins in **{report['store']}**; POP TTFB {cfg['ttfb_ms']} ms.\n\n"
        "Median over rounds [min, max], milliseconds:\n\n"
        + table(["", "p50", "p90", "p99"], rows)
        + "\n\n"
        + table(
            ["target", "goal", "measured", "verdict"],
            [
                [
                    "added p50",
                    f"≤ {t['added_p50_ms']['target']} ms",
                    fmt(t["added_p50_ms"]["value"], 3),
                    verdict(t["added_p50_ms"]["ok"]),
                ],
                [
                    "added p99",
                    f"≤ {t['added_p99_ms']['target']} ms",
                    fmt(t["added_p99_ms"]["value"], 3),
                    verdict(t["added_p99_ms"]["ok"]),
                ],
                ["errors", "0", t["errors"]["value"], verdict(t["errors"]["ok"])],
            ],
        )
        + f"\n\nProxy CPU per request at concurrency 1: {report['proxy_cpu_us_per_request']} µs; "
        f"proxy RSS after the run: {report['proxy_rss_mb']} MB.\n\n"
        "![latency CDF](latency-cdf.png)\n\n![added latency by round](added-by-round.png)\n"
    )
    (out / "summary.md").write_text(md)


def _rounds_plot(path: Path, report: dict[str, Any]) -> None:
    plt = _pyplot()
    rounds = report["rounds"]
    xs = [r["round"] + 1 for r in rounds]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = {"p50": ("#1f77b4", "o"), "p90": ("#9467bd", "s"), "p99": ("#d62728", "^")}
    for k, (color, marker) in styles.items():
        ax.plot(xs, [r["added"][k] for r in rounds], marker=marker, color=color, label=f"added {k}")
    ax.axhline(TARGET_ADDED_P50_MS, color=styles["p50"][0], ls="--", lw=1, label="p50 target")
    ax.axhline(TARGET_ADDED_P99_MS, color=styles["p99"][0], ls="--", lw=1, label="p99 target")
    ax.set_xlabel("round")
    ax.set_ylabel("pinproxy minus direct (ms)")
    ax.set_title("Latency added by pinproxy, per round", fontweight="bold")
    ax.set_xticks(xs)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
