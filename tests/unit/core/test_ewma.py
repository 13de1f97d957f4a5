"""The peak-EWMA estimator and the per-backend load tracker, on a hand-moved clock."""

from __future__ import annotations

import math

import pytest

from proxy.core.clock import ManualClock
from proxy.core.ewma import FAILURE_MAX_S, FAILURE_MIN_S, LoadTracker, PeakEwma


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def test_initial_value_before_any_sample_does_not_decay(clock: ManualClock) -> None:
    ewma = PeakEwma(clock, decay_s=10.0, initial_s=0.05)
    assert ewma.value() == 0.05
    clock.advance(1_000.0)
    assert ewma.value() == 0.05
    assert ewma.cost(0) == 0.05


def test_first_sample_replaces_the_guess(clock: ManualClock) -> None:
    ewma = PeakEwma(clock, decay_s=10.0, initial_s=0.05)
    ewma.observe(0.01)  # lower than the guess: still taken as is
    assert ewma.value() == pytest.approx(0.01)


def test_peak_jumps_up_at_once(clock: ManualClock) -> None:
    ewma = PeakEwma(clock, decay_s=10.0, initial_s=0.05)
    ewma.observe(0.1)
    clock.advance(0.001)
    ewma.observe(2.0)
    assert ewma.value() == pytest.approx(2.0, rel=1e-3)


def test_lower_sample_is_mixed_by_elapsed_time(clock: ManualClock) -> None:
    ewma = PeakEwma(clock, decay_s=10.0, initial_s=0.05)
    ewma.observe(1.0)
    clock.advance(10.0)  # one time constant: the old value keeps weight 1/e
    ewma.observe(0.0)
    # The read right after an update is the updated value itself.
    assert ewma.value() == pytest.approx(math.exp(-1.0))
    ewma.observe(0.1)  # dt = 0: a lower sample at the same instant changes nothing
    assert ewma.value() == pytest.approx(math.exp(-1.0))


def test_slowdown_is_forgotten_slowly_under_steady_traffic(clock: ManualClock) -> None:
    ewma = PeakEwma(clock, decay_s=10.0, initial_s=0.05)
    ewma.observe(0.05)
    clock.advance(0.1)
    ewma.observe(1.0)  # one slow response
    for _ in range(10):  # a second of fast responses
        clock.advance(0.1)
        ewma.observe(0.05)
    assert ewma.value() > 0.8  # still remembered as mostly slow
    for _ in range(600):  # a minute more
        clock.advance(0.1)
        ewma.observe(0.05)
    assert ewma.value() == pytest.approx(0.05, rel=0.1)


def test_reads_decay_toward_zero_when_idle(clock: ManualClock) -> None:
    ewma = PeakEwma(clock, decay_s=10.0, initial_s=0.05)
    ewma.observe(2.0)
    clock.advance(10.0)
    assert ewma.value() == pytest.approx(2.0 * math.exp(-1.0))
    clock.advance(90.0)
    assert ewma.value() == pytest.approx(2.0 * math.exp(-10.0))
    # A slow-once, then idle backend ends up cheaper than a busy healthy one: re-probed.
    busy = PeakEwma(clock, decay_s=10.0, initial_s=0.05)
    busy.observe(0.05)
    assert ewma.cost(0) < busy.cost(0)


def test_reads_do_not_destroy_information(clock: ManualClock) -> None:
    read_often = PeakEwma(clock, decay_s=10.0, initial_s=0.05)
    never_read = PeakEwma(clock, decay_s=10.0, initial_s=0.05)
    for e in (read_often, never_read):
        e.observe(1.0)
    for _ in range(100):
        clock.advance(0.05)
        read_often.value()
        read_often.cost(3)
    for e in (read_often, never_read):
        e.observe(0.2)
    assert read_often.value() == pytest.approx(never_read.value())
    expected = 1.0 * math.exp(-0.5) + 0.2 * (1 - math.exp(-0.5))
    assert never_read.value() == pytest.approx(expected)


def test_cost_multiplies_by_inflight_plus_one(clock: ManualClock) -> None:
    ewma = PeakEwma(clock, decay_s=10.0, initial_s=0.05)
    ewma.observe(0.2)
    assert ewma.cost(0) == pytest.approx(0.2)
    assert ewma.cost(1) == pytest.approx(0.4)
    assert ewma.cost(4) == pytest.approx(1.0)


def test_inflight_still_counts_when_the_estimate_decayed_to_nothing(clock: ManualClock) -> None:
    ewma = PeakEwma(clock, decay_s=1.0, initial_s=0.05)
    ewma.observe(0.0)
    clock.advance(10_000.0)
    assert ewma.cost(0) < ewma.cost(1) < ewma.cost(5)


def test_clock_going_nowhere_or_negative_samples_are_harmless(clock: ManualClock) -> None:
    ewma = PeakEwma(clock, decay_s=10.0, initial_s=0.05)
    ewma.observe(-1.0)
    assert ewma.value() == 0.0


@pytest.mark.parametrize(("decay", "initial"), [(0.0, 0.05), (-1.0, 0.05), (1.0, -0.1)])
def test_rejects_nonsense_parameters(clock: ManualClock, decay: float, initial: float) -> None:
    with pytest.raises(ValueError, match="must"):
        PeakEwma(clock, decay_s=decay, initial_s=initial)


# --- LoadTracker ------------------------------------------------------------------------


def test_tracker_counts_inflight_and_never_goes_negative(clock: ManualClock) -> None:
    loads = LoadTracker(clock, decay_s=10.0, initial_s=0.05)
    assert loads.inflight("a") == 0
    loads.start("a")
    loads.start("a")
    assert loads.inflight("a") == 2
    assert loads.cost("a") == pytest.approx(0.05 * 3)
    loads.finish("a", 0.05)
    loads.finish("a", 0.05)
    loads.finish("a", 0.05)  # one finish too many (e.g. after forget): clamps at zero
    assert loads.inflight("a") == 0


def test_tracker_unknown_backend_costs_the_initial_guess(clock: ManualClock) -> None:
    loads = LoadTracker(clock, decay_s=10.0, initial_s=0.05)
    assert loads.cost("new") == 0.05
    assert loads.ewma_s("new") == 0.05
    assert "new" not in repr(loads)  # reads do not create entries


def test_tracker_prefers_the_faster_backend(clock: ManualClock) -> None:
    loads = LoadTracker(clock, decay_s=10.0, initial_s=0.05)
    for bid, ttfb in (("fast", 0.02), ("slow", 0.3)):
        loads.start(bid)
        loads.finish(bid, ttfb)
    assert loads.cost("fast") < loads.cost("slow")
    assert loads.ewma_s("slow") == pytest.approx(0.3)


def test_failure_is_a_penalty_not_a_free_fast_sample(clock: ManualClock) -> None:
    loads = LoadTracker(clock, decay_s=10.0, initial_s=0.05)
    loads.start("a")
    loads.finish("a", 0.02)
    loads.start("a")
    loads.finish("a", None)
    assert loads.ewma_s("a") == pytest.approx(FAILURE_MIN_S)
    assert loads.inflight("a") == 0
    loads.start("a")
    loads.finish("a", None)
    assert loads.ewma_s("a") == pytest.approx(2 * FAILURE_MIN_S)


def test_repeated_failures_are_capped(clock: ManualClock) -> None:
    loads = LoadTracker(clock, decay_s=10.0, initial_s=0.05)
    for _ in range(50):
        loads.finish("a", None)
    assert loads.ewma_s("a") == pytest.approx(FAILURE_MAX_S)
    clock.advance(100.0)  # ten time constants idle: attractive enough to be tried again
    assert loads.ewma_s("a") < 0.01


def test_forget_drops_the_history(clock: ManualClock) -> None:
    loads = LoadTracker(clock, decay_s=10.0, initial_s=0.05)
    loads.start("a")
    loads.finish("a", 3.0)
    loads.start("a")
    loads.forget("a")
    assert loads.inflight("a") == 0
    assert loads.ewma_s("a") == 0.05


def test_tracker_repr_shows_estimates_and_inflight(clock: ManualClock) -> None:
    loads = LoadTracker(clock, decay_s=10.0, initial_s=0.05)
    loads.start("b1")
    loads.finish("b1", 0.123)
    loads.start("b1")
    assert repr(loads) == "LoadTracker(decay_s=10.0, {b1: 123.0ms x1})"
