"""``python -m bench <scenario> [options]``: run one benchmark, write its report.

Scenarios: overhead, throughput, streaming, sse, incident, kill-switch, store-faults,
profile, ab (see bench/README.md). Run from the repository root; results go to
bench/results/<scenario>-<timestamp>/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--out", type=Path, default=None, help="results root (default bench/results)"
    )
    common.add_argument("--no-pin", action="store_true", help="do not pin processes with taskset")
    common.add_argument(
        "--proxy-set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a pinproxy setting (TOML value), e.g. log.request_log=false; repeatable",
    )
    subs = parser.add_subparsers(dest="scenario", required=True)

    p = subs.add_parser("overhead", parents=[common], help="added latency at concurrency 1")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--requests", type=int, default=300, help="per round and side")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--turns", type=int, default=8, help="requests per session")
    p.add_argument("--store", choices=("redis", "memory"), default="redis")
    p.add_argument("--ttfb-ms", type=float, default=0.0)

    p = subs.add_parser("throughput", parents=[common], help="ceiling and latency at fixed rates")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per measured run")
    p.add_argument(
        "--rounds", type=int, default=3, help="closed-loop rounds, the targets interleaved"
    )
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop connections")
    p.add_argument(
        "--levels",
        type=_floats,
        default=(0.5, 0.8, 0.95),
        help="open-loop rates as fractions of each target's ceiling",
    )
    p.add_argument(
        "--targets",
        default="direct,pinproxy-1w,pinproxy-2w,nginx,vllm-router",
        help="comma-separated subset of direct,pinproxy-1w,pinproxy-2w,nginx,vllm-router,"
        "python-floor (bench/floor_proxy.py, not run by default)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "sim", "static"),
        default="auto",
        help="auto: nginx answering from memory when nginx is installed, else the sim POP",
    )
    p.add_argument(
        "--generator",
        choices=("auto", "wrk", "builtin"),
        default="auto",
        help="closed-loop generator (open loop is always the built-in one)",
    )
    p.add_argument("--store", choices=("redis", "memory"), default="redis")
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument(
        "--turns", type=int, default=1, help="consecutive requests per session id (1: round robin)"
    )
    p.add_argument(
        "--same-sessions",
        action="store_true",
        help="every run on the same session ids (cache hits only after the warm-up)",
    )

    p = subs.add_parser("streaming", parents=[common], help="many concurrent SSE streams")
    p.add_argument("--streams", type=_ints, default=(100, 1000, 2000))
    p.add_argument("--tokens-per-second", type=float, default=2.0)
    p.add_argument("--completion-tokens", type=int, default=6)
    p.add_argument("--ramp", type=float, default=3.0, help="seconds over which streams start")
    p.add_argument("--ttfb-ms", type=float, default=5.0)
    p.add_argument("--store", choices=("redis", "memory"), default="redis")

    p = subs.add_parser(
        "sse", parents=[common], help="SSE at LLM rates: CPU per chunk, gaps, vs baselines"
    )
    p.add_argument(
        "--levels",
        default="200,1000@25,2000@12.5",
        help="concurrent streams per level, N or N@tokens_per_second (comma-separated)",
    )
    p.add_argument("--tokens-per-second", type=float, default=50.0)
    p.add_argument("--completion-tokens", type=int, default=200)
    p.add_argument("--ramp", type=float, default=2.0, help="seconds over which streams start")
    p.add_argument(
        "--targets",
        default="direct,pinproxy,nginx,vllm-router",
        help="comma-separated subset of direct,pinproxy,nginx,vllm-router",
    )
    p.add_argument("--store", choices=("redis", "memory"), default="redis")

    p = subs.add_parser("incident", parents=[common], help="replay of the 67%% rollout incident")
    p.add_argument(
        "--duration", type=float, default=20.0, help="seconds per run (pinproxy, control)"
    )
    p.add_argument("--sessions", type=int, default=240)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--poll-interval", type=float, default=0.5, help="proxy /version poll interval")
    p.add_argument("--seed", type=int, default=47)

    p = subs.add_parser(
        "kill-switch", parents=[common], help="incident replay with a bad v47: the soak judge"
    )
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--sessions", type=int, default=300)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--bad-every", type=int, default=10, help="v47: 1 in N JSON answers bad")
    p.add_argument("--min-samples", type=int, default=100, help="rollout.min_samples")
    p.add_argument("--seed", type=int, default=47)

    p = subs.add_parser(
        "store-faults", parents=[common], help="pause, kill, restart empty, failover of Redis"
    )
    p.add_argument("--sessions", type=int, default=40)
    p.add_argument("--interval", type=float, default=0.05, help="seconds between a session's turns")
    p.add_argument("--phase", type=float, default=3.0, help="seconds of traffic after each fault")
    p.add_argument("--pause", type=float, default=7.0, help="SIGSTOP length (s)")
    p.add_argument("--outage", type=float, default=1.0, help="down time before the restart (s)")
    p.add_argument("--new-sessions", type=int, default=200)
    p.add_argument("--no-sentinel", action="store_true", help="skip the Sentinel failover run")

    p = subs.add_parser(
        "ab", parents=[common], help="two trees' CPU per request as paired same-run ratios"
    )
    p.add_argument("--a", type=Path, required=True, help="tree A (holds a proxy/ package)")
    p.add_argument("--b", type=Path, required=True, help="tree B, reported as B/A")
    p.add_argument("--a-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a pinproxy setting for side A only (after --proxy-set); repeatable")
    p.add_argument("--b-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a pinproxy setting for side B only, e.g. log.request_log=false "
                   "with --a and --b the same tree: what the setting costs; repeatable")
    p.add_argument("--pairs", type=int, default=10, help="A/B pairs, run A B, B A, A B, ...")
    p.add_argument("--store", choices=("redis", "memory"), default="redis")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per measured run")
    p.add_argument(
        "--levels", type=_floats, default=(0.5,), help="open-loop rates, fractions of ceiling"
    )
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--sessions", type=int, default=1000)

    p = subs.add_parser("profile", parents=[common], help="py-spy profile of pinproxy under load")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--store", choices=("redis", "memory"), default="redis")
    p.add_argument("--turns", type=int, default=1, help="consecutive requests per session id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    report: dict[str, Any]
    pin = not args.no_pin
    if args.scenario == "overhead":
        from bench import overhead

        report = overhead.run(
            overhead.OverheadConfig(
                rounds=args.rounds,
                requests=args.requests,
                warmup=args.warmup,
                turns=args.turns,
                store=args.store,
                ttfb_ms=args.ttfb_ms,
                pin=pin,
                out_root=args.out,
                proxy_set=tuple(args.proxy_set),
            )
        )
    elif args.scenario == "throughput":
        from bench import throughput

        report = throughput.run(
            throughput.ThroughputConfig(
                duration_s=args.duration,
                rounds=args.rounds,
                concurrency=args.concurrency,
                levels=args.levels,
                targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                backend=args.backend,
                generator=args.generator,
                store=args.store,
                sessions=args.sessions,
                turns=args.turns,
                fresh_sessions=not args.same_sessions,
                pin=pin,
                out_root=args.out,
                proxy_set=tuple(args.proxy_set),
            )
        )
    elif args.scenario == "streaming":
        from bench import streaming

        report = streaming.run(
            streaming.StreamingConfig(
                streams=args.streams,
                tokens_per_second=args.tokens_per_second,
                completion_tokens=args.completion_tokens,
                ramp_s=args.ramp,
                ttfb_ms=args.ttfb_ms,
                store=args.store,
                pin=pin,
                out_root=args.out,
                proxy_set=tuple(args.proxy_set),
            )
        )
    elif args.scenario == "sse":
        from bench import sse

        report = sse.run(
            sse.SseConfig(
                levels=tuple(x.strip() for x in args.levels.split(",") if x.strip()),
                tokens_per_second=args.tokens_per_second,
                completion_tokens=args.completion_tokens,
                ramp_s=args.ramp,
                targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                store=args.store,
                pin=pin,
                out_root=args.out,
                proxy_set=tuple(args.proxy_set),
            )
        )
    elif args.scenario == "store-faults":
        from bench import store_faults

        report = store_faults.run(
            store_faults.StoreFaultsConfig(
                sessions=args.sessions,
                interval_s=args.interval,
                phase_s=args.phase,
                pause_s=args.pause,
                outage_s=args.outage,
                new_sessions=args.new_sessions,
                sentinel=not args.no_sentinel,
                pin=pin,
                out_root=args.out,
                proxy_set=tuple(args.proxy_set),
            )
        )
    elif args.scenario == "profile":
        from bench import profile

        report = profile.run(
            profile.ProfileConfig(
                duration_s=args.duration,
                rate_hz=args.rate,
                concurrency=args.concurrency,
                store=args.store,
                turns=args.turns,
                pin=pin,
                out_root=args.out,
                proxy_set=tuple(args.proxy_set),
            )
        )
    elif args.scenario == "ab":
        from bench import ab

        report = ab.run(
            ab.AbConfig(
                a=args.a,
                b=args.b,
                pairs=args.pairs,
                store=args.store,
                duration_s=args.duration,
                levels=args.levels,
                concurrency=args.concurrency,
                sessions=args.sessions,
                pin=pin,
                out_root=args.out,
                proxy_set=tuple(args.proxy_set),
                a_set=tuple(args.a_set),
                b_set=tuple(args.b_set),
            )
        )
    elif args.scenario == "kill-switch":
        from bench import kill_switch

        report = kill_switch.run(
            kill_switch.KillSwitchConfig(
                duration_s=args.duration,
                sessions=args.sessions,
                turns=args.turns,
                bad_every=args.bad_every,
                min_samples=args.min_samples,
                seed=args.seed,
                pin=pin,
                out_root=args.out,
                proxy_set=tuple(args.proxy_set),
            )
        )
    else:
        from bench import incident

        report = incident.run(
            incident.IncidentConfig(
                duration_s=args.duration,
                sessions=args.sessions,
                turns=args.turns,
                poll_interval_s=args.poll_interval,
                seed=args.seed,
                pin=pin,
                out_root=args.out,
                proxy_set=tuple(args.proxy_set),
            )
        )
    out = report["out"]
    print((Path(out) / "summary.md").read_text())
    print(f"results: {out}")
    failed = [name for name, t in report.get("targets", {}).items() if t.get("ok") is False]
    if failed:
        print(f"targets missed: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
