"""Rollout discipline (proxy/core/rollout.py): region cutover, gates, rollback, the soak judge."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.core.models import Backend, BackendState, Snapshot, VersionBundle
from proxy.core.rollout import (
    RegionState,
    RolloutPolicy,
    RolloutState,
    evaluate,
    force,
    judge,
    roll_back,
    threshold,
)
from proxy.core.soak import Counts

NOW = 1_700_000_000.0
V46, V47, V48 = (VersionBundle(prompt=p).key() for p in ("v46", "v47", "v48"))
POLICY = RolloutPolicy(settle_s=0.0, soak_s=600.0)


def replica(bid: str, region: str, key: str, *, healthy: bool = True) -> BackendState:
    return BackendState(
        backend=Backend(bid, region, f"http://{bid}"), version=VersionBundle(prompt=key[7:]),
        version_key=key, healthy=healthy,
    )


def fleet(*states: BackendState, blocked: frozenset[str] = frozenset()) -> Snapshot:
    return Snapshot(backends=states, blocked_versions=blocked)


def steady(**regions: str) -> RolloutState:
    return RolloutState({r: RegionState(current=v, since=NOW - 3600) for r, v in regions.items()},
                        rev=1)


def kinds(events: list) -> list[tuple[str, str, str]]:
    return [(e.kind, e.region, e.version) for e in events]


def test_a_region_is_first_seen_at_what_most_of_its_replicas_serve() -> None:
    snap = fleet(replica("a", "eu", V46), replica("b", "eu", V46), replica("c", "eu", V47))
    state, events = evaluate(RolloutState(), snap, POLICY, NOW)
    assert state.regions["eu"].current == V46
    assert kinds(events) == [("initialised", "eu", V46)]


def test_a_mixed_region_keeps_its_current_version_until_the_last_replica_flips() -> None:
    state = steady(eu=V46)
    for flipped in range(1, 3):
        reps = [replica(f"r{i}", "eu", V47 if i < flipped else V46) for i in range(3)]
        state, events = evaluate(state, fleet(*reps), POLICY, NOW)
        assert state.regions["eu"].current == V46
        assert events == []
    reps = [replica(f"r{i}", "eu", V47) for i in range(3)]
    state, events = evaluate(state, fleet(*reps), POLICY, NOW + 1)
    assert state.regions["eu"].current == V47
    assert state.regions["eu"].soaking
    assert kinds(events) == [("flipped", "eu", V47)]


def test_a_flip_waits_for_the_settle_time() -> None:
    policy = RolloutPolicy(settle_s=5.0)
    snap = fleet(replica("a", "eu", V47))
    state, _ = evaluate(steady(eu=V46), snap, policy, NOW)
    assert state.regions["eu"].current == V46
    assert state.regions["eu"].phase == "mixed"
    state, events = evaluate(state, snap, policy, NOW + 5)
    assert kinds(events) == [("flipped", "eu", V47)]


def test_a_replica_down_on_the_current_version_is_not_a_completed_cutover() -> None:
    snap = fleet(replica("a", "eu", V47), replica("b", "eu", V46, healthy=False))
    state, events = evaluate(steady(eu=V46), snap, POLICY, NOW)
    assert state.regions["eu"].current == V46  # on_current_lost = other_regions
    flip = RolloutPolicy(settle_s=0.0, on_current_lost="flip")
    state, events = evaluate(steady(eu=V46), snap, flip, NOW)
    assert kinds(events) == [("flipped", "eu", V47)]


def test_only_one_region_soaks_at_a_time() -> None:
    state = steady(eu=V46, us=V46)
    snap = fleet(replica("a", "eu", V47), replica("b", "us", V47))
    state, events = evaluate(state, snap, POLICY, NOW)
    assert kinds(events) == [("flipped", "eu", V47), ("held_back", "us", V47)]
    assert events[1].detail["reason"] == "soak_limit"
    assert state.regions["us"].current == V46
    state, events = evaluate(state, snap, POLICY, NOW + 10)
    assert events == []  # held back once, not once per check
    state, events = evaluate(state, snap, POLICY, NOW + 600)
    assert kinds(events) == [("soak_passed", "eu", V47), ("flipped", "us", V47)]


def test_a_replica_whose_view_predates_a_hold_keeps_it_and_it_is_one_event() -> None:
    # Replica A sees both us replicas on v47 at NOW while eu soaks: us is held back.
    # Replica B's last polls of us (at NOW - 0.5) still say v46: it must not clear the
    # candidate, or A would find it again and record the same hold once more.
    state = steady(us=V46)
    state = replace(state, regions={**state.regions, "eu": RegionState(
        V47, NOW - 1, previous=V46, soaking=True)})
    eu = replace(replica("e", "eu", V47), reported_at=NOW)
    fresh = fleet(eu, *(replace(replica(b, "us", V47), reported_at=NOW) for b in "ab"))
    stale = fleet(eu, *(replace(replica(b, "us", V46), reported_at=NOW - 0.5) for b in "ab"))
    held, events = evaluate(state, fresh, POLICY, NOW)
    assert kinds(events) == [("held_back", "us", V47)]
    transcript = [evaluate(held, stale, POLICY, NOW + 0.1),  # replica B
                  evaluate(held, fresh, POLICY, NOW + 0.2)]  # replica A again
    assert transcript == [(held, []), (held, [])]
    # Once B's view is newer than the candidate, a runtime really back on v46 is followed.
    back = fleet(eu, *(replace(replica(b, "us", V46), reported_at=NOW + 1) for b in "ab"))
    state, events = evaluate(held, back, POLICY, NOW + 1)
    assert (state.regions["us"].candidate, state.regions["us"].held, events) == (None, None, [])


def test_a_third_version_waits_until_the_previous_rollout_completes() -> None:
    state = steady(eu=V47, us=V46, ap=V46)
    snap = fleet(replica("a", "eu", V47), replica("b", "us", V46), replica("c", "ap", V48))
    state, events = evaluate(state, snap, POLICY, NOW)
    assert kinds(events) == [("held_back", "ap", V48)]
    assert events[0].detail["reason"] == "previous_rollout_incomplete"
    # us completes v47 (and soaks); ap then may take v48 once nothing else soaks.
    snap = fleet(replica("a", "eu", V47), replica("b", "us", V47), replica("c", "ap", V48))
    state, events = evaluate(state, snap, POLICY, NOW + 1)
    assert ("flipped", "us", V47) in kinds(events)
    assert state.regions["ap"].current == V46
    state, events = evaluate(state, snap, POLICY, NOW + 700)
    assert state.regions["ap"].current == V46  # eu, us on v47; ap on v46: still two
    assert state.regions["ap"].held == "previous_rollout_incomplete"


def test_a_blocked_version_is_held_back() -> None:
    snap = fleet(replica("a", "eu", V47), blocked=frozenset({"v47"}))
    state, events = evaluate(steady(eu=V46), snap, POLICY, NOW)
    assert events[0].detail["reason"] == "blocked"
    assert state.regions["eu"].current == V46


def test_a_rollback_returns_every_region_together_and_keeps_them_off_it() -> None:
    state = RolloutState({
        "eu": RegionState(V47, NOW, previous=V46, soaking=True),
        "us": RegionState(V46, NOW - 99),
    }, rev=3)
    state, events = roll_back(state, V47, NOW + 1, repin=True)
    assert kinds(events) == [("rolled_back", "eu", V46)]
    assert state.regions["eu"].current == V46
    assert state.regions["us"].halted == V47
    assert state.rollbacks == {V47: V46}
    snap = fleet(replica("a", "eu", V47), replica("b", "us", V47))
    state, events = evaluate(state, snap, POLICY, NOW + 2)
    assert events == []  # the halted version is never a candidate again


def test_an_operator_forces_a_region() -> None:
    state, event = force(steady(eu=V46), "eu", V47, NOW)
    assert (event.kind, state.regions["eu"].current, state.rev) == ("forced", V47, 2)


# --- the judge ----------------------------------------------------------------------------


def _soak(rng: random.Random, p_new: float, p_old: float, policy: RolloutPolicy,
          per_look: int = 20) -> bool:
    """Play one soak: each look adds ``per_look`` requests per side; True if it trips."""
    new = old = Counts()
    for _ in range(policy.looks):
        nf = sum(rng.random() < p_new for _ in range(per_look))
        of = sum(rng.random() < p_old for _ in range(per_look))
        new = Counts(new.trials + per_look, new.failures + nf)
        old = Counts(old.trials + per_look, old.failures + of)
        if judge({"structured_output": new}, {"structured_output": old}, policy).regressed:
            return True
    return False


SOAK = RolloutPolicy(soak_s=120.0, check_interval_s=1.0, min_samples=200, margin=0.005,
                     alpha=0.01)


def test_a_version_at_3_percent_failures_against_0_1_percent_trips_within_the_soak() -> None:
    rng = random.Random(47)
    assert all(_soak(rng, 0.03, 0.001, SOAK) for _ in range(5))


def test_a_version_no_worse_than_the_previous_does_not_trip() -> None:
    rng = random.Random(46)
    trips = sum(_soak(rng, 0.001, 0.001, SOAK) for _ in range(40))
    assert trips == 0
    trips = sum(_soak(rng, 0.05, 0.05, SOAK) for _ in range(40))
    assert trips == 0  # a high but equal rate is no regression either


def test_nothing_is_judged_below_the_minimum_sample() -> None:
    verdict = judge({"errors": Counts(199, 199)}, {"errors": Counts(1000, 0)}, SOAK)
    assert not verdict.regressed
    assert verdict.signal is None


def test_the_threshold_splits_alpha_over_looks_and_signals() -> None:
    # alpha 0.01 over 120 looks and 3 signals: 2.8e-5 per look, one-sided.
    assert threshold(SOAK) == pytest.approx(4.03, abs=0.01)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(200, 100_000), failures=st.integers(0, 100_000),
       base=st.integers(200, 100_000))
@example(n=200, failures=0, base=200)
def test_a_rate_no_higher_than_the_baseline_never_regresses(n: int, failures: int,
                                                            base: int) -> None:
    failures = min(failures, n)
    # The old side at the same or a higher rate.
    old_failures = min(base, -(-failures * base // n))
    verdict = judge({"errors": Counts(n, failures)}, {"errors": Counts(base, old_failures)},
                    SOAK)
    assert not verdict.regressed


def test_rollbacks_never_chain_or_cycle() -> None:
    from proxy.core.rollout import with_rollback

    assert with_rollback({}, V47, V46) == {V47: V46}
    assert with_rollback({V47: V46}, V46, V47) == {V46: V47}  # the other way: replaced
    assert with_rollback({V48: V47}, V47, V46) == {V48: V46, V47: V46}  # no chain


def test_forcing_the_current_version_keeps_its_soak() -> None:
    state = RolloutState({"eu": RegionState(current="v47", since=10.0, previous="v46",
                                            soaking=True)}, rev=3)
    after, event = force(state, "eu", "v47", 20.0)
    assert after is state  # the region flipped by itself before the operator's force
    assert (event.kind, event.detail["already_current"]) == ("forced", True)
    moved, _ = force(state, "eu", "v46", 20.0)
    assert moved.regions["eu"] == RegionState(current="v46", since=20.0, previous="v47",
                                              soaking=True)


def test_a_replica_whose_view_predates_the_flip_does_not_flip_the_region_back() -> None:
    # Replica A flipped eu to v47 at NOW on fresh reports; replica B's last poll of the
    # region's backend (at NOW - 1) still says v46. B must not read that as a rollout.
    flipped = RolloutState({"eu": RegionState(V47, NOW, previous=V46, soaking=True)}, rev=2)
    stale = replace(replica("a", "eu", V46), reported_at=NOW - 1)
    state, events = evaluate(flipped, fleet(stale), POLICY, NOW + 0.5)
    assert (state, events) == (flipped, [])
    # Once B's view is newer than the flip, a runtime really back on v46 is followed.
    fresh = replace(replica("a", "eu", V46), reported_at=NOW + 2)
    state, events = evaluate(flipped, fleet(fresh), POLICY, NOW + 2)
    assert kinds(events) == [("flipped", "eu", V46)]
