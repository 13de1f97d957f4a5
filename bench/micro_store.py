"""Microbenchmark: what a new session costs the Redis pin store, in round trips and CPU.

``python -m bench.micro_store [--sessions N] [--rounds R] [--concurrency C]``

No HTTP, no proxy process: this process is the pin store (``RedisPinStore``, as the
data plane holds it) against a private ``redis-server`` on a free port (never 6379).
Every round creates ``sessions`` new sessions, each in one of two ways, interleaved,
the order flipping every round:

- two calls: ``lookup`` finds no pin, then ``pin_if_absent`` writes one (what every new
  session did before the lookup script could write a proposal, and what a session
  still does when the lookup cannot: a continuing conversation, a held copy);
- one call: ``lookup`` with the proposal, written by the lookup script if none is held.

Per session: round trips (the calls the Redis call helper measured), this process's CPU
time (the client's share: redis-py building, packing and parsing, the helper, the
store) and the wall time; ``concurrency`` sessions at a time (the data plane's load).
The table shows the median over rounds and the ratio of the two. The machine may be
shared: compare the two ways measured in the same run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from bench.micro_observers import private_redis
from proxy.config.store import StoreConfig
from proxy.core.clock import SystemClock
from proxy.core.models import Pin
from proxy.redis.client import redis_client_from_config
from proxy.redis.metrics import RedisMetrics
from proxy.store.redis import RedisPinStore

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

WAYS = ("two calls", "one call")


def _calls(registry: CollectorRegistry) -> float:
    total = 0.0
    for metric in registry.collect():
        if metric.name == "pinproxy_redis_call_duration_seconds":
            total += sum(s.value for s in metric.samples if s.name.endswith("_count"))
    return total


async def _round(store: RedisPinStore, registry: CollectorRegistry, way: str, prefix: str,
                 sessions: int, concurrency: int) -> dict[str, float]:
    pin = Pin("prompt=v47", "pop-1", "bench", time.time())

    async def two_calls(session_id: str) -> None:
        found = await store.lookup(session_id)
        assert found.pin is None
        await store.pin_if_absent(session_id, pin)

    async def one_call(session_id: str) -> None:
        found = await store.lookup(session_id, propose=lambda: pin)
        assert found.created, found

    create: Callable[[str], Awaitable[None]] = two_calls if way == WAYS[0] else one_call
    ids = [f"{prefix}-{n}" for n in range(sessions)]
    calls_before = _calls(registry)
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, sessions, concurrency):
        await asyncio.gather(*(create(s) for s in ids[start:start + concurrency]))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "round_trips": (_calls(registry) - calls_before) / sessions,
        "cpu_us": cpu / sessions * 1e6,
        "wall_us": wall / sessions * 1e6,
    }


async def measure(url: str, sessions: int, rounds: int, concurrency: int) -> dict[str, Any]:
    config = StoreConfig(kind="redis", url=url, key_prefix="micro:", op_timeout_ms=2000,
                         touch_interval_s=3600.0)  # no touch batch inside a round
    registry = CollectorRegistry()
    store = RedisPinStore(config, redis_client_from_config(config), SystemClock(),
                          metrics=RedisMetrics(registry))
    await store.start()
    try:
        # Warm up: the pool's connections opened, the script cached on the server.
        await _round(store, registry, WAYS[1], f"c{concurrency}-warm", concurrency * 4,
                     concurrency)
        samples: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
        for n in range(rounds):
            for way in WAYS if n % 2 == 0 else tuple(reversed(WAYS)):
                samples[way].append(await _round(
                    store, registry, way, f"c{concurrency}-r{n}-{way}", sessions, concurrency))
    finally:
        await store.close()
    return {way: {key: sorted(s[key] for s in runs)[len(runs) // 2] for key in runs[0]}
            for way, runs in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_store", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=4000, help="new sessions per round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--concurrency", type=str, default="1,64",
                        help="sessions created at a time (comma-separated)")
    args = parser.parse_args(argv)
    with private_redis() as redis:
        if redis is None:
            print("redis-server not found on PATH", file=sys.stderr)
            return 2
        url, _ = redis
        print(f"new sessions: {args.sessions} per round, {args.rounds} rounds, median")
        print("| concurrency | way | round trips | client CPU µs | wall µs |")
        print("|---:|---|---:|---:|---:|")
        for level in (int(c) for c in args.concurrency.split(",")):
            result = asyncio.run(measure(url, args.sessions, args.rounds, level))
            for way in WAYS:
                r = result[way]
                print(f"| {level} | {way} | {r['round_trips']:.2f} | {r['cpu_us']:.1f} | "
                      f"{r['wall_us']:.1f} |")
            ratio = result[WAYS[1]]["cpu_us"] / result[WAYS[0]]["cpu_us"]
            print(f"| {level} | one ÷ two, CPU | | {ratio:.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
