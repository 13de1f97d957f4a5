"""GC tuning: thresholds and freezing applied, and every collection's pause reported."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from proxy.config.settings import RuntimeConfig
from proxy.runtime.gc_tuning import GcPauses, tune_gc
from proxy.telemetry.metrics import ProxyMetrics


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """Put the interpreter's collector back as it was: the tests share the process."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class StepClock:
    """Each call is 0.25 s after the previous one."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_sets_thresholds_and_freezes_what_exists() -> None:
    survivor = [object() for _ in range(10)]  # alive at "start-up": must be frozen
    gc.unfreeze()
    tune_gc(RuntimeConfig(gc_thresholds=(1234, 5, 678)))
    assert gc.get_threshold() == (1234, 5, 678)
    assert gc.get_freeze_count() > len(survivor)
    assert not any(obj is survivor for obj in gc.get_objects(generation=2))


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_can_leave_the_heap_unfrozen() -> None:
    gc.unfreeze()
    tune_gc(RuntimeConfig(gc_freeze_after_start=False, gc_thresholds=(900, 11, 12)))
    assert gc.get_threshold() == (900, 11, 12)
    assert gc.get_freeze_count() == 0


def test_each_collection_is_reported_with_its_generation_and_duration() -> None:
    seen: list[tuple[str, float]] = []
    pauses = GcPauses(lambda generation, seconds: seen.append((generation, seconds)), StepClock())
    pauses.install()
    try:
        gc.collect(1)
        gc.collect(2)
    finally:
        pauses.uninstall()
    # Automatic gen-0 collections may interleave; the two asked for are there, in order.
    asked = [entry for entry in seen if entry[0] != "0"]
    assert asked == [("1", 0.25), ("2", 0.25)]
    count = len(seen)
    gc.collect()
    assert len(seen) == count  # uninstalled: no more reports
    assert pauses._callback not in gc.callbacks


def test_install_twice_reports_once() -> None:
    seen: list[str] = []
    pauses = GcPauses(lambda generation, seconds: seen.append(generation))
    pauses.install()
    pauses.install()
    try:
        gc.collect(2)
    finally:
        pauses.uninstall()
    assert seen.count("2") == 1
    pauses.uninstall()  # harmless when not installed


def test_pauses_reach_the_metrics_histogram() -> None:
    metrics = ProxyMetrics(CollectorRegistry())
    pauses = GcPauses(metrics.gc_paused)
    pauses.install()
    try:
        gc.collect(2)
    finally:
        pauses.uninstall()
    text = generate_latest(metrics.registry).decode()
    assert 'pinproxy_gc_pause_seconds_count{generation="2"} 1.0' in text
