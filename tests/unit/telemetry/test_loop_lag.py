"""The event-loop lag monitor: a blocked loop shows up as a late tick, an idle one does not."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from proxy.telemetry.loop_lag import LoopLagMonitor
from proxy.telemetry.metrics import ProxyMetrics


async def test_a_blocked_loop_is_reported_as_lag() -> None:
    seen: list[float] = []
    monitor = LoopLagMonitor(seen.append, interval_s=0.01)
    monitor.start()
    try:
        await asyncio.sleep(0.05)
        quiet = list(seen)
        time.sleep(0.2)  # noqa: ASYNC251 - holding the loop, as a long GC pause would, is the point
        await asyncio.sleep(0.05)
    finally:
        monitor.stop()
    assert quiet, "the monitor ticked while the loop was free"
    after = seen[len(quiet):]
    # The tick that was due during the block ran at least ~0.19 s late.
    assert max(after) >= 0.15
    assert monitor.worst_s == max(seen)
    assert "worst_ms=" in repr(monitor)


async def test_stop_ends_the_ticks_and_start_twice_is_one_monitor() -> None:
    seen: list[float] = []
    monitor = LoopLagMonitor(seen.append, interval_s=0.01)
    monitor.start()
    monitor.start()
    await asyncio.sleep(0.1)
    monitor.stop()
    ticks = monitor.ticks
    # One timer chain, not two: at 10 ms per tick, 0.1 s gives at most ~10 ticks.
    assert 1 <= ticks <= 12
    await asyncio.sleep(0.05)
    assert monitor.ticks == ticks
    assert len(seen) == ticks


async def test_lag_reaches_the_metrics_histogram() -> None:
    metrics = ProxyMetrics(CollectorRegistry())
    monitor = LoopLagMonitor(metrics.loop_lag.observe, interval_s=0.01)
    monitor.start()
    await asyncio.sleep(0.05)
    monitor.stop()
    text = generate_latest(metrics.registry).decode()
    count = next(line for line in text.splitlines()
                 if line.startswith("pinproxy_event_loop_lag_seconds_count"))
    assert float(count.split()[-1]) == monitor.ticks > 0


async def test_worst_since_sees_only_ticks_due_after_the_given_time() -> None:
    now = [100.0]  # a fake clock: lateness is exactly what the test sets
    monitor = LoopLagMonitor(lambda lag: None, interval_s=0.01, clock=lambda: now[0])
    monitor.start()  # first tick due at 100.01
    now[0] = 100.51
    await asyncio.sleep(0.05)  # it runs 0.5 s late; the next is due at 100.52
    now[0] = 101.0
    await asyncio.sleep(0.05)  # that one runs 0.48 s late
    monitor.stop()
    assert monitor.worst_since(100.0) == pytest.approx(0.5)
    assert monitor.worst_since(100.2) == pytest.approx(0.48)
    assert monitor.worst_since(102.0) == 0.0  # stopped: nothing overdue counts


async def test_a_tick_that_is_overdue_right_now_counts() -> None:
    monitor = LoopLagMonitor(lambda lag: None, interval_s=0.01)
    monitor.start()
    try:
        await asyncio.sleep(0.03)
        started = time.monotonic()
        time.sleep(0.2)  # noqa: ASYNC251 - the loop is held: the next tick cannot run yet
        assert monitor.worst_since(started) >= 0.15
    finally:
        monitor.stop()
