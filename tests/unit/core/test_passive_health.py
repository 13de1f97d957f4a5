"""Passive health and outlier detection (proxy/fleet/registry.py, proxy/core/outlier.py)."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from proxy.core.clock import ManualClock
from proxy.core.models import Backend, VersionBundle
from proxy.core.outlier import OutlierPolicy, OutlierState
from proxy.fleet.registry import Registry

T0 = 1_700_000_000.0
V1 = VersionBundle(prompt="v1")
POLICY = OutlierPolicy(consecutive_failures=3, base_ejection_s=10, max_ejection_s=25,
                       max_ejected_percent=50)


def fleet(clock: ManualClock, *ids: str, push: tuple[str, ...] = ()) -> Registry:
    backends = [Backend(i, "r1", f"http://{i}:8000",
                        version_source="push" if i in push else "poll") for i in ids]
    reg = Registry(backends, dimensions=("prompt",), unhealthy_after=3, healthy_after=2,
                   clock=clock, outlier=POLICY)
    for i in ids:
        reg.report_version(i, V1, "poll")
        reg.report_success(i)
    return reg


def test_a_failed_connection_makes_a_backend_unhealthy_at_once() -> None:
    reg = fleet(ManualClock(T0), "a", "b")
    reg.mark_suspect("a", "refused")
    assert not reg.snapshot.by_id["a"].healthy
    assert reg.health_history("a")[-1][1:] == (False, "passive: refused")


def test_a_suspect_backend_is_readmitted_by_one_fresh_poll_not_by_hysteresis() -> None:
    reg = fleet(ManualClock(T0), "a")
    reg.mark_suspect("a", "reset")
    reg.report_success("a")  # one poll, although healthy_after is 2
    assert reg.snapshot.by_id["a"].healthy


def test_a_poll_already_in_flight_when_the_backend_failed_does_not_readmit_it() -> None:
    # A POP that dies while a poll is in flight may still have answered that poll: the
    # answer is from before the failure and must not undo "suspect at once".
    reg = fleet(ManualClock(T0), "a")
    before = reg.check_started()
    reg.mark_suspect("a", "reset")
    reg.report_success("a", before)
    assert not reg.snapshot.by_id["a"].healthy
    reg.report_success("a", reg.check_started())  # a poll begun after the failure
    assert reg.snapshot.by_id["a"].healthy


def test_a_push_mode_backend_cannot_be_polled_so_it_is_ejected_for_a_while() -> None:
    clock = ManualClock(T0)
    reg = fleet(clock, "a", push=("a",))
    reg.mark_suspect("a", "refused")
    state = reg.snapshot.by_id["a"]
    assert state.healthy
    assert state.ejected_until == T0 + 10


def test_consecutive_failures_eject_with_a_growing_interval_and_probation() -> None:
    clock = ManualClock(T0)
    reg = fleet(clock, "a", "b")
    for _ in range(3):
        reg.report_result("a", False)
    assert reg.snapshot.by_id["a"].ejected_until == T0 + 10
    clock.advance(10)
    reg.report_result("a", False)  # on probation: one failure is enough
    assert reg.snapshot.by_id["a"].ejected_until == clock.time() + 20
    clock.advance(20)
    for _ in range(3):
        reg.report_result("a", True)  # probation passed: the past is forgotten
    for _ in range(2):
        reg.report_result("a", False)
    assert reg.snapshot.by_id["a"].ejected_until <= clock.time()


def test_a_success_between_failures_resets_the_count() -> None:
    reg = fleet(ManualClock(T0), "a", "b")
    for ok in (False, False, True, False, False):
        reg.report_result("a", ok)
    assert reg.snapshot.by_id["a"].ejected_until == 0.0


def test_at_most_the_configured_share_of_a_version_is_ejected() -> None:
    reg = fleet(ManualClock(T0), "a", "b", "c", "d")
    for backend in "abcd":
        for _ in range(3):
            reg.report_result(backend, False)
    ejected = [s.id for s in reg.snapshot.backends if s.ejected_until > T0]
    assert ejected == ["a", "b"]  # 50% of four


@given(results=st.lists(st.booleans(), max_size=60), gaps=st.lists(st.floats(0, 30),
                                                                    max_size=60))
@example(results=[False] * 10, gaps=[0.0] * 10)
def test_an_ejection_never_exceeds_its_cap_and_never_starts_without_failures(
    results: list[bool], gaps: list[float]
) -> None:
    state = OutlierState()
    now = T0
    for i, ok in enumerate(results):
        now += gaps[i] if i < len(gaps) else 0.0
        if state.record(ok, now, POLICY):
            assert not ok
            until = state.eject(now, POLICY)
            assert now < until <= now + POLICY.max_ejection_s
