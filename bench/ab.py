"""Scenario ``ab``: two pinproxy trees' CPU per request, as same-run paired ratios.

On a shared machine one run of a tree says little: its CPU per request moves by a
quarter between runs as neighbours come and go. What holds up is a comparison of
runs made back to back, many times over. ``ab`` runs the ``throughput`` scenario's
``pinproxy-1w`` target (one worker on the proxy's own core, fresh sessions, a
private Redis or the memory store) alternately from tree A and tree B in the order
A B, B A, A B, ... (each tree goes first in half the pairs, so a drift within a pair
favours neither), and reports each pair's ratio B/A: its median, a distribution-free
interval for that median (the sign test's order statistics) beside a bootstrap one,
and the sign test of "no difference". A tree is any directory holding a ``proxy/``
package, e.g. ``git worktree add --detach /tmp/pre <commit>``; before each run the
bench checks that the child will import ``proxy`` from that tree and not from the
checkout installed in the bench's interpreter, and records where it did. A and B may
be the same tree with different settings (``a_set`` / ``b_set``, applied after the
common ``proxy_set``): what one setting costs, e.g. ``--b-set log.request_log=false``.

The measure is the closed-loop ceiling's proxy CPU µs per request (the proxy's whole
process tree, from /proc); the open-loop run at ``levels`` of each run's own ceiling
is reported beside it. ``machine_busy_cores`` per run says how loaded the machine was.
"""

from __future__ import annotations

import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from bench import throughput
from bench.procs import Layout, machine_facts, proxy_source
from bench.report import md_header, new_run_dir, write_json
from bench.stats import fmt, paired_ratios, table

CEILING = "proxy_cpu_us_per_request"


@dataclass(frozen=True, slots=True)
class AbConfig:
    a: Path
    b: Path
    pairs: int = 10
    store: Literal["redis", "memory"] = "redis"
    duration_s: float = 6.0
    levels: tuple[float, ...] = (0.5,)
    concurrency: int = 64
    sessions: int = 1000
    proxy_set: tuple[str, ...] = ()
    a_set: tuple[str, ...] = ()  # settings of side A only, after proxy_set
    b_set: tuple[str, ...] = ()
    pin: bool = True
    out_root: Path | None = None


def order(pairs: int) -> list[tuple[int, str]]:
    """``(pair, side)`` in run order: A B, B A, A B, ..."""
    runs: list[tuple[int, str]] = []
    for pair in range(pairs):
        runs += [(pair, "a"), (pair, "b")] if pair % 2 == 0 else [(pair, "b"), (pair, "a")]
    return runs


def describe_tree(tree: Path) -> dict[str, Any]:
    """The tree's commit and whether its ``proxy/`` differs from it (a dirty tree's
    numbers are not that commit's)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(tree), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "path": str(tree),
        "commit": git("rev-parse", "HEAD") or None,
        "proxy_dirty": bool(git("status", "--porcelain", "--", "proxy")),
        "proxy_source": str(proxy_source(tree)),
    }


def _one(
    cfg: AbConfig, tree: Path, runs_root: Path, side_set: tuple[str, ...] = ()
) -> dict[str, Any]:
    report = throughput.run(
        throughput.ThroughputConfig(
            duration_s=cfg.duration_s,
            rounds=1,
            concurrency=cfg.concurrency,
            levels=cfg.levels,
            targets=("pinproxy-1w",),
            store=cfg.store,
            sessions=cfg.sessions,
            pop_ceiling=False,
            proxy_set=cfg.proxy_set + side_set,
            proxy_src=tree,
            pin=cfg.pin,
            out_root=runs_root,
        )
    )
    result = report["results"]["pinproxy-1w"]
    ceiling = result["ceiling"]
    if result.get("proxy_source") != str(tree / "proxy"):
        raise RuntimeError(f"run of {tree} imported {result.get('proxy_source')}")
    open_loop = result["open_loop"]
    return {
        "cpu_us": ceiling[CEILING],
        "rps": ceiling["rps"],
        "errors": ceiling["errors"] + sum(r["errors"] for r in open_loop),
        "open_cpu_us": open_loop[0][CEILING] if open_loop else None,
        "machine_busy_cores": ceiling["machine_busy_cores"],
        "redis_commands_per_request": ceiling.get("redis_commands_per_request"),
        "proxy_source": result["proxy_source"],
        "proxy_set": list(report["config"]["proxy_set"]),  # what the run was given
        "out": report["out"],
    }


def run(cfg: AbConfig) -> dict[str, Any]:
    out = new_run_dir("ab", cfg.out_root)
    trees = {"a": cfg.a.resolve(), "b": cfg.b.resolve()}
    described = {side: describe_tree(tree) for side, tree in trees.items()}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    runs: list[dict[str, Any]] = []
    for pair, side in order(cfg.pairs):
        side_set = cfg.a_set if side == "a" else cfg.b_set
        row = _one(cfg, trees[side], out / "runs", side_set) | {"pair": pair, "side": side}
        runs.append(row)
        print(f"pair {pair} {side}: {row['cpu_us']:.1f} µs/req, {row['rps']:.0f} req/s, "
              f"busy {row['machine_busy_cores']:.2f} cores", flush=True)  # fmt: skip
    report = {
        "scenario": "ab",
        "out": str(out),
        "started": started,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine_facts() | {"proxy_src": "per run, see trees"},
        "layout": Layout.detect(pin=cfg.pin).describe(),
        "trees": described,
        "runs": runs,
        **summarize(runs),
    }
    write_json(out / "report.json", report)
    (out / "summary.md").write_text(_summary(report))
    return report


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-pair ratios B/A of the ceiling's and the open loop's CPU per request, and
    each side's median, spread and machine load."""
    by_pair: dict[int, dict[str, dict[str, Any]]] = {}
    for row in runs:
        by_pair.setdefault(row["pair"], {})[row["side"]] = row
    complete = [p for _, p in sorted(by_pair.items()) if {"a", "b"} <= set(p)]

    def ratios(key: str) -> list[float]:
        return [p["b"][key] / p["a"][key] for p in complete if p["a"][key] and p["b"][key]]

    sides = {}
    for side in ("a", "b"):
        rows = [r for r in runs if r["side"] == side]
        sides[side] = {
            "cpu_us": [r["cpu_us"] for r in rows],
            "median_cpu_us": statistics.median(r["cpu_us"] for r in rows) if rows else None,
            "machine_busy_cores": [r["machine_busy_cores"] for r in rows],
            "errors": sum(r["errors"] for r in rows),
        }
    ceiling, opened = ratios("cpu_us"), ratios("open_cpu_us")
    return {
        "sides": sides,
        "ratios": {"ceiling": [round(r, 4) for r in ceiling],
                   "open_loop": [round(r, 4) for r in opened]},
        "ratio_b_over_a": {
            "ceiling": paired_ratios(ceiling) if ceiling else None,
            "open_loop": paired_ratios(opened) if opened else None,
        },
    }  # fmt: skip


def _summary(report: dict[str, Any]) -> str:
    trees, sides = report["trees"], report["sides"]
    lines = [
        md_header(
            "ab: CPU per request, tree B over tree A, paired runs",
            report["machine"], report["layout"], report["command"],
        )
    ]  # fmt: skip
    lines.append(
        table(
            ["side", "tree", "commit", "runs (µs/req)", "median", "busy cores (min-max)"],
            [
                (
                    side.upper(),
                    trees[side]["path"] + "".join(
                        f" `{setting}`" for setting in report["config"][f"{side}_set"]
                    ),
                    (trees[side]["commit"] or "?")[:10]
                    + (" (+changes)" if trees[side]["proxy_dirty"] else ""),
                    ", ".join(f"{v:.0f}" for v in sides[side]["cpu_us"]),
                    sides[side]["median_cpu_us"],
                    f"{min(sides[side]['machine_busy_cores']):.2f}-"
                    f"{max(sides[side]['machine_busy_cores']):.2f}",
                )
                for side in ("a", "b")
            ],
            digits=1,
        )
    )
    rows = []
    for name, s in report["ratio_b_over_a"].items():
        if s is None:
            continue
        rows.append((
            name, s["pairs"], s["median"],
            f"{s['sign_low']:.3f}-{s['sign_high']:.3f} ({s['sign_coverage']:.1%})",
            f"{s['bootstrap_low']:.3f}-{s['bootstrap_high']:.3f}",
            f"{s['b_higher']}/{s['b_lower']}", s["sign_test_p"],
        ))  # fmt: skip
    headers = ["CPU/request", "pairs", "median B/A", "sign-test interval", "bootstrap 95%",
               "B higher/lower", "sign test p"]  # fmt: skip
    lines += [
        "",
        table(headers, rows, digits=3),
        "",
        "Per-pair ratios (ceiling): " + ", ".join(fmt(r, 3) for r in report["ratios"]["ceiling"]),
        "",
    ]
    return "\n".join(lines)
