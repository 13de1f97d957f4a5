"""Rollout discipline for new sessions: per-region cutover, one version at a time, soak.

Theory of operation
-------------------
pinproxy cannot deploy backends, but it decides which version every *new* session
gets, so it can enforce background.md's discipline (prompts as database migrations)
wherever the deploy system is in its rollout. This module is the pure part: the
rollout state and the function that moves it, given the registry's snapshot and the
time. proxy/fleet/rollout_control.py runs it, shares the state between replicas and acts
on its events; routing reads the result from the snapshot (``region_current``).

A replica decides a region's next step only on reports newer than the region's current
state (every routable replica's last report at or after ``since``, and after
``candidate_since`` while there is a candidate): replicas poll on their own schedules,
and one that has not yet seen what another flipped the region on would otherwise flip
it back, or clear a candidate that the other then finds (and holds back) again.

Each region has a *current* version: the only one its backends serve to new sessions
(in ``atomic`` mode). While a region's replicas are mixed (some report v47, some
still v46), new sessions there get the current version, on the replicas still
serving it. The region *flips* in one instant, for every pinproxy replica at once
(the state is shared), when every replica in it reports the new version, held for
``settle_s``; or when an operator forces it. Pinned sessions are unaffected: they keep
their version wherever it is served.

A flip waits (it is *held back*, an event every time the reason changes) when:
- the version is blocked for new sessions (the kill switch);
- it is a third version while two are current in different regions (the previous
  rollout is incomplete: one version live globally before the next);
- ``max_soaking_regions`` regions are already soaking.

After a flip the region *soaks* for ``soak_s``: ``judge`` compares the new version's
failure rates there with the previous version's, and a regression halts the rollout
(proxy/fleet/rollout_control.py blocks the version fleet-wide and returns every region
that runs it to its previous version). A soak that passes leaves the region steady.

When a region's current version has no healthy backend left while others in it run
a new version, ``on_current_lost`` decides: ``other_regions`` (default: the region
takes no new sessions; latency routing sends them to other regions' current
versions) or ``flip`` (the region flips as if the rollout had completed).

The regression rule (``judge``): for each signal (upstream errors, structured-output
failures, eval failures) a one-sided two-proportion z-test of "new rate exceeds the
old one by more than ``margin``", run only once both sides have ``min_samples``.
It is checked continuously, so each look uses ``alpha / looks`` (Bonferroni over
the looks a soak can make and over the signals): the chance that a version no worse
than the previous trips anywhere during one soak stays below ``alpha``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import TYPE_CHECKING, Literal

from proxy.core.soak import Counts, Signal

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from proxy.core.models import Snapshot

RegionMode = Literal["atomic", "per_replica"]
OnCurrentLost = Literal["other_regions", "flip"]
SIGNALS: tuple[Signal, ...] = ("errors", "structured_output", "evals")


@dataclass(frozen=True, slots=True)
class RolloutPolicy:
    mode: RegionMode = "atomic"
    modes: Mapping[str, RegionMode] = field(default_factory=dict)  # per-region override
    settle_s: float = 0.0
    soak_s: float = 600.0
    max_soaking_regions: int = 1
    on_current_lost: OnCurrentLost = "other_regions"
    # The regression rule.
    alpha: float = 0.01
    margin: float = 0.005
    min_samples: int = 200
    check_interval_s: float = 1.0

    def mode_of(self, region: str) -> RegionMode:
        return self.modes.get(region, self.mode)

    @property
    def looks(self) -> int:
        """How many times one soak is judged, at most (for the Bonferroni split)."""
        return max(1, math.ceil(self.soak_s / self.check_interval_s))


@dataclass(frozen=True, slots=True)
class RegionState:
    """One region's rollout state. Times are wall-clock seconds."""

    current: str  # the version key new sessions in this region get
    since: float  # when it became current
    previous: str | None = None
    soaking: bool = False  # since ``since``, for ``soak_s``
    halted: str | None = None  # a rolled-back version this region must not flip to
    rolled_back: bool = False  # this region ran ``halted`` and was returned from it
    candidate: str | None = None  # what every replica reports, waiting for settle_s
    candidate_since: float = 0.0
    held: str | None = None  # why the candidate is held back

    @property
    def phase(self) -> str:
        if self.rolled_back:
            return "halted"
        if self.soaking:
            return "soaking"
        return "mixed" if self.candidate is not None else "steady"


@dataclass(frozen=True, slots=True)
class RolloutState:
    regions: Mapping[str, RegionState] = field(default_factory=dict)
    rev: int = 0  # bumped by every change; compare-and-set in the shared store
    # Rolled-back version -> the version its pinned sessions move to on their next
    # request (``on_regression = "block_and_repin"`` or POST /admin/rollback).
    rollbacks: Mapping[str, str] = field(default_factory=dict)

    def currents(self) -> dict[str, str]:
        return {r: s.current for r, s in self.regions.items()}


EventKind = Literal[
    "initialised", "flipped", "held_back", "soak_passed", "regression", "rolled_back",
    "forced",
]


@dataclass(frozen=True, slots=True)
class RolloutEvent:
    at: float
    kind: EventKind
    region: str
    version: str
    detail: Mapping[str, object] = field(default_factory=dict)
    # The pinproxy replica that took the decision (set by the controller that recorded
    # it; the pure functions here do not know which replica runs them).
    replica: str | None = None


# --- the evaluator -------------------------------------------------------------------------


def evaluate(
    state: RolloutState, snapshot: Snapshot, policy: RolloutPolicy, now: float
) -> tuple[RolloutState, list[RolloutEvent]]:
    """Move every region's state on; return the new state and what happened."""
    regions = dict(state.regions)
    events: list[RolloutEvent] = []
    by_region: dict[str, list[tuple[str | None, bool]]] = {}
    reported: dict[str, float] = {}  # per region: its oldest report among routable replicas
    for s in snapshot.backends:
        by_region.setdefault(s.region, []).append((s.version_key, s.routable))
        if s.routable and s.reported_at is not None:
            reported[s.region] = min(reported.get(s.region, math.inf), s.reported_at)
    for region in sorted(by_region):
        replicas = by_region[region]
        healthy = {key for key, ok in replicas if ok and key is not None}
        known = {key for key, _ in replicas if key is not None}
        rs = regions.get(region)
        if rs is None:
            if not healthy:
                continue
            first = _majority([k for k, ok in replicas if ok and k is not None])
            regions[region] = RegionState(current=first, since=now)
            events.append(RolloutEvent(now, "initialised", region, first,
                                       {"serving": sorted(healthy)}))
            continue
        if rs.soaking and now - rs.since >= policy.soak_s:
            rs = replace(rs, soaking=False)
            events.append(RolloutEvent(now, "soak_passed", region, rs.current,
                                       {"soak_s": policy.soak_s}))
        regions[region] = rs
        if reported.get(region, math.inf) < max(rs.since, rs.candidate_since):
            # This replica's view of the region predates its current state (another
            # replica flipped it, or found its candidate, on fresher reports): it must
            # not decide on it, or a replica whose poll lags would flip the region back
            # to what it last saw, or clear a candidate that another replica then finds
            # again (a held-back decision recorded once per round, a settle restarted).
            continue
        regions[region] = rs = _next(rs, region, healthy, known, policy, now)
    # Gates need every region's currents, so flips are decided in a second pass.
    for region in sorted(regions):
        rs = regions[region]
        if rs.candidate is None or now - rs.candidate_since < policy.settle_s:
            continue
        reason = _held_because(region, rs.candidate, regions, snapshot, policy)
        if reason is not None:
            if rs.held != reason:
                events.append(RolloutEvent(now, "held_back", region, rs.candidate,
                                           {"reason": reason, "current": rs.current}))
                regions[region] = replace(rs, held=reason)
            continue
        regions[region] = RegionState(current=rs.candidate, since=now, previous=rs.current,
                                      soaking=True)
        events.append(RolloutEvent(now, "flipped", region, rs.candidate,
                                   {"previous": rs.current}))
    if regions == dict(state.regions):
        return state, events
    return RolloutState(regions, state.rev + 1, state.rollbacks), events


def _next(rs: RegionState, region: str, healthy: set[str], known: set[str],
          policy: RolloutPolicy, now: float) -> RegionState:
    """The region's candidate, from what its replicas report now."""
    candidate: str | None = None
    if len(healthy) == 1:
        (only,) = healthy
        if only != rs.current and only != rs.halted:
            complete = rs.current not in known  # no replica, up or down, reports it
            if complete or policy.on_current_lost == "flip":
                candidate = only
    if rs.halted is not None and rs.halted not in known:
        rs = replace(rs, halted=None, rolled_back=False)  # the bad version is gone from here
    if candidate is None:
        return replace(rs, candidate=None, candidate_since=0.0, held=None)
    if candidate == rs.candidate:
        return rs
    return replace(rs, candidate=candidate, candidate_since=now, held=None)


def _held_because(region: str, candidate: str, regions: Mapping[str, RegionState],
                  snapshot: Snapshot, policy: RolloutPolicy) -> str | None:
    if snapshot.blocks(candidate):
        return "blocked"
    currents = {s.current for s in regions.values()}
    if candidate not in currents and len(currents) >= 2:
        return "previous_rollout_incomplete"
    soaking = sum(1 for r, s in regions.items() if s.soaking and r != region)
    if soaking >= policy.max_soaking_regions:
        return "soak_limit"
    return None


def _majority(keys: list[str]) -> str:
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return min(counts, key=lambda k: (-counts[k], k))


def force(state: RolloutState, region: str, version: str, now: float
          ) -> tuple[RolloutState, RolloutEvent]:
    """An operator makes ``version`` current in ``region`` now (no settle, no gates).

    Forcing the version that is current already changes nothing (a soak under way
    goes on: the force arrived after the region flipped by itself)."""
    old = state.regions.get(region)
    if old is not None and old.current == version:
        return state, RolloutEvent(now, "forced", region, version,
                                   {"previous": version, "already_current": True})
    rs = RegionState(current=version, since=now, previous=None if old is None else old.current,
                     soaking=old is not None and old.current != version)
    regions = {**state.regions, region: rs}
    detail = {"previous": None if old is None else old.current}
    return (RolloutState(regions, state.rev + 1, state.rollbacks),
            RolloutEvent(now, "forced", region, version, detail))


def roll_back(
    state: RolloutState,
    bad: str,
    now: float,
    *,
    target: Callable[[str, RegionState], str | None] | None = None,
    repin: bool = False,
) -> tuple[RolloutState, list[RolloutEvent]]:
    """Every region whose current is ``bad`` returns to ``target(region, state)`` (by
    default its previous version), together; every region is kept from flipping to
    ``bad``; with ``repin``, sessions pinned to ``bad`` move on their next request."""
    regions = dict(state.regions)
    events: list[RolloutEvent] = []
    for region, rs in state.regions.items():
        goal = rs.previous if target is None else target(region, rs)
        if rs.current == bad and goal is not None and goal != bad:
            regions[region] = RegionState(current=goal, since=now, halted=bad, rolled_back=True)
            events.append(RolloutEvent(now, "rolled_back", region, goal, {"from": bad}))
        elif rs.current != bad:
            candidate = None if rs.candidate == bad else rs.candidate
            regions[region] = replace(rs, candidate=candidate, halted=bad)
    rollbacks = dict(state.rollbacks)
    if repin:
        goal = next((e.version for e in events), None)
        if goal is not None:
            rollbacks = with_rollback(rollbacks, bad, goal)
    if regions == dict(state.regions) and rollbacks == dict(state.rollbacks):
        return state, events
    return RolloutState(regions, state.rev + 1, rollbacks), events


def with_rollback(rollbacks: Mapping[str, str], bad: str, goal: str) -> dict[str, str]:
    """``rollbacks`` plus bad -> goal, kept free of chains and cycles: the goal is the
    good version now (its own rollback is dropped), and what led to ``bad`` leads on."""
    out = {k: (goal if v == bad else v) for k, v in rollbacks.items() if k != goal}
    out[bad] = goal
    return {k: v for k, v in out.items() if k != v}


# --- the regression judge --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    regressed: bool
    signal: Signal | None
    new: Counts
    old: Counts
    z: float
    threshold: float

    def evidence(self) -> dict[str, object]:
        return {
            "signal": self.signal, "new_trials": self.new.trials,
            "new_failures": self.new.failures, "new_rate": round(self.new.rate, 6),
            "old_trials": self.old.trials, "old_failures": self.old.failures,
            "old_rate": round(self.old.rate, 6), "z": round(self.z, 3),
            "z_threshold": round(self.threshold, 3),
        }


def threshold(policy: RolloutPolicy) -> float:
    """The z a single look must exceed: alpha split over every look and signal."""
    per_look = policy.alpha / (policy.looks * len(SIGNALS))
    return NormalDist().inv_cdf(1.0 - per_look)


def judge(new: Mapping[Signal, Counts], old: Mapping[Signal, Counts],
          policy: RolloutPolicy) -> Verdict:
    """Has the new version regressed against the old one? (see the module docstring)"""
    z_needed = threshold(policy)
    worst = Verdict(False, None, Counts(), Counts(), 0.0, z_needed)
    for signal in SIGNALS:
        n, o = new.get(signal, Counts()), old.get(signal, Counts())
        if n.trials < policy.min_samples or o.trials < policy.min_samples:
            continue
        z = _z(n, o, policy.margin)
        verdict = Verdict(z > z_needed, signal, n, o, z, z_needed)
        if verdict.regressed:
            return verdict
        if worst.signal is None or z > worst.z:
            worst = verdict
    return worst


def _z(new: Counts, old: Counts, margin: float) -> float:
    """One-sided z of H1: rate(new) - rate(old) > margin (pooled standard error)."""
    pooled = (new.failures + old.failures) / (new.trials + old.trials)
    variance = pooled * (1 - pooled) * (1 / new.trials + 1 / old.trials)
    if variance <= 0:
        # No failure on either side (or all failed): only a gap beyond the margin counts.
        return math.inf if new.rate - old.rate > margin else 0.0
    return (new.rate - old.rate - margin) / math.sqrt(variance)
