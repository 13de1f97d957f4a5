"""TrafficCounter in memory mode on a hand-moved clock: minute windows, retention, shares."""

from __future__ import annotations

import pytest

from proxy.core.clock import ManualClock
from proxy.core.events import RequestEvent
from proxy.telemetry.traffic import MINUTE_S, TrafficCounter, Window

T0 = 1_700_000_000.0 - (1_700_000_000.0 % 60) + 30  # half a minute into a minute


def event(
    at: float, region: str | None = "r1", key: str | None = "prompt=v1", backend: str | None = "a"
) -> RequestEvent:
    return RequestEvent(
        at=at, request_id="r", trace_id="t", session_id=None, method="POST", path="/x",
        status=200, backend_id=backend, region=region, version_key=key, new_pin=False,
        version_changed=None, duration_s=0.01, ttfb_s=0.01, error_type=None,
    )  # fmt: skip


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


async def test_counts_per_region_and_version_within_the_window(clock: ManualClock) -> None:
    counter = TrafficCounter(clock)
    for _ in range(3):
        counter.observe(event(T0, "r1", "prompt=v1"))
    counter.observe(event(T0, "r1", "prompt=v2"))
    counter.observe(event(T0 - 1, "r2", "prompt=v2"))
    window = await counter.window(300)
    assert window.counts == {("r1", "prompt=v1"): 3, ("r1", "prompt=v2"): 1, ("r2", "prompt=v2"): 1}
    assert window.total == 5
    assert window.by_region() == {"r1": {"prompt=v1": 3, "prompt=v2": 1}, "r2": {"prompt=v2": 1}}
    assert window.by_version() == {"prompt=v1": 3, "prompt=v2": 2}
    assert window.until == T0
    assert window.since == T0 - 30 - 4 * MINUTE_S  # current minute + the four before


async def test_requests_nobody_served_are_not_counted(clock: ManualClock) -> None:
    counter = TrafficCounter(clock)
    counter.observe(event(T0, backend=None, region=None))  # e.g. 503 version_unavailable
    counter.observe(event(T0, region=None))
    counter.observe(event(T0, key=None))
    assert (await counter.window(3600)).total == 0


async def test_window_boundaries_are_whole_minutes(clock: ManualClock) -> None:
    counter = TrafficCounter(clock)
    minute_start = T0 - 30
    counter.observe(event(minute_start - 4 * MINUTE_S))  # first minute of a 5-min window
    counter.observe(event(minute_start - 4 * MINUTE_S - 0.001))  # just before it
    counter.observe(event(minute_start - 59 * MINUTE_S))  # inside the hour
    counter.observe(event(minute_start - 60 * MINUTE_S))  # just outside the hour
    assert (await counter.window(300)).total == 1
    assert (await counter.window(240)).total == 0
    assert (await counter.window(301)).total == 2  # rounds up to six minutes
    assert (await counter.window(3600)).total == 3
    assert (await counter.window(1)).total == 0  # at least the current minute
    clock.advance(MINUTE_S)
    assert (await counter.window(300)).total == 0  # the window moved on


async def test_old_minutes_are_dropped_after_retention(clock: ManualClock) -> None:
    counter = TrafficCounter(clock, retention_s=10 * MINUTE_S)
    counter.observe(event(T0))
    assert counter.pending == 1
    clock.advance(11 * MINUTE_S)
    counter.observe(event(clock.time(), "r2"))  # a new minute prunes the old ones
    assert counter.pending == 1
    assert (await counter.window(86_400)).counts == {("r2", "prompt=v1"): 1}


async def test_memory_mode_has_nothing_to_flush_or_close(clock: ManualClock) -> None:
    counter = TrafficCounter(clock)
    assert counter.shared is False
    await counter.start()
    counter.observe(event(T0))
    await counter.flush()
    await counter.close()
    await counter.close()
    assert (await counter.window(60)).total == 1
    assert repr(counter).startswith("TrafficCounter(mode=memory, cells=1")


def test_window_views_are_consistent() -> None:
    window = Window(0.0, 60.0, {("r1", "k1"): 2, ("r2", "k1"): 3, ("r2", "k2"): 5})
    assert window.total == 10
    assert window.by_version() == {"k1": 5, "k2": 5}
    assert sum(sum(v.values()) for v in window.by_region().values()) == window.total
