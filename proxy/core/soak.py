"""PURE: what each version did in each region, and how much of it came before an instant.

Theory of operation
-------------------
The soak judge (``proxy.core.rollout.judge``) compares a region's new version with the
previous one over the soak window ``[flip, flip + soak_s]``. The flip is the instant of
the compare-and-set that made the new version current (``RegionState.since``), decided
by whichever replica won it. Every replica judges what it proxied itself, and learns of
the flip a moment later (a pub/sub notice, its next check, or after a store outage).
Counts taken when it learns would put what was answered between the flip and that
moment into the baseline instead of the evidence: a bad version's first failures, or
an eval batch pushed right after the cutover, would never be judged.

So the ledger keeps, per cell (region, version, signal), cumulative counts since the
ledger was made (``born``), plus the recent increments in time buckets of
``resolution_s`` for ``horizon_s``. Each increment is stamped with the request's
arrival time (or an eval push's time), so requests finishing out of order land in the
right bucket. ``before(t)`` — the counts of what arrived before ``t`` — is the
cumulative count minus every kept bucket at or after ``t``'s bucket. It is exact to
the bucket (what arrived in the flip's own bucket, at most ``resolution_s`` before it,
counts in the window) whenever nothing at or after ``t``'s bucket has been pruned:
``t`` within the horizon, or before ``born`` (a replica started mid-soak has nothing
before the flip). Otherwise (a replica that learned of the flip later than the
horizon) it falls back to everything counted so far, and says so (``exact`` False).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Iterable

Signal = Literal["errors", "structured_output", "evals"]
Cell = tuple[str, str, Signal]  # (region, version key, signal)

RESOLUTION_S = 0.01


@dataclass(frozen=True, slots=True)
class Counts:
    """Trials and failures of one signal."""

    trials: int = 0
    failures: int = 0

    @property
    def rate(self) -> float:
        return self.failures / self.trials if self.trials else 0.0

    def __sub__(self, other: Counts) -> Counts:
        return Counts(self.trials - other.trials, self.failures - other.failures)


@dataclass(frozen=True, slots=True)
class Before:
    """A version's counts before an instant, per signal; ``exact``: see the module doc."""

    counts: dict[Signal, Counts]
    exact: bool


class SoakLedger:
    """Cumulative counts per cell, and recent ones by arrival time (see the module doc)."""

    __slots__ = ("_born_tick", "_buckets", "_horizon_ticks", "_latest", "_pruned_until",
                 "_resolution", "_ticks", "_totals")

    def __init__(self, *, born: float, horizon_s: float,
                 resolution_s: float = RESOLUTION_S) -> None:
        self._resolution = resolution_s
        self._horizon_ticks = max(1, math.ceil(horizon_s / resolution_s))
        self._born_tick = self._tick(born)
        self._totals: dict[Cell, list[int]] = {}
        self._buckets: dict[int, dict[Cell, list[int]]] = {}
        self._ticks: list[int] = []  # a heap of the buckets' ticks, for pruning
        self._latest = self._born_tick
        # Every increment at or before this tick is in the totals only.
        self._pruned_until = self._born_tick - 1

    def _tick(self, at: float) -> int:
        return math.floor(at / self._resolution)

    def add(self, at: float, region: str, version: str, signal: Signal, trials: int,
            failures: int) -> None:
        """Count ``trials`` (``failures`` of them failed) that arrived at ``at``."""
        cell = (region, version, signal)
        total = self._totals.get(cell)
        if total is None:
            total = self._totals[cell] = [0, 0]
        total[0] += trials
        total[1] += failures
        tick = self._tick(at)
        if tick <= self._pruned_until:
            return  # older than anything kept: in the totals only
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = {}
            heapq.heappush(self._ticks, tick)
        counts = bucket.get(cell)
        if counts is None:
            counts = bucket[cell] = [0, 0]
        counts[0] += trials
        counts[1] += failures
        if tick > self._latest:
            self._latest = tick
            self._prune(tick - self._horizon_ticks)

    def _prune(self, cutoff: int) -> None:
        ticks = self._ticks
        while ticks and ticks[0] < cutoff:
            del self._buckets[heapq.heappop(ticks)]
        self._pruned_until = max(self._pruned_until, cutoff - 1)

    def totals(self, version: str, region: str | None = None) -> dict[Signal, Counts]:
        """Everything counted for ``version`` in ``region`` (every region: None)."""
        return _sum(self._totals.items(), version, region)

    def before(self, at: float, version: str, region: str | None = None) -> Before:
        """What of ``version`` (in ``region``) arrived before ``at``'s bucket."""
        tick = self._tick(at)
        if tick <= self._born_tick:
            return Before({}, exact=True)
        exact = tick > self._pruned_until
        since = [c for t, bucket in self._buckets.items() if t >= tick for c in bucket.items()]
        after = _sum(since, version, region) if exact else {}
        totals = self.totals(version, region)
        return Before({s: c - after.get(s, Counts()) for s, c in totals.items()}, exact)

    def __repr__(self) -> str:
        return f"SoakLedger(cells={len(self._totals)}, buckets={len(self._buckets)})"


def _sum(cells: Iterable[tuple[Cell, list[int]]], version: str, region: str | None
         ) -> dict[Signal, Counts]:
    out: dict[Signal, list[int]] = {}
    for (r, v, signal), (trials, failures) in cells:
        if v == version and (region is None or r == region):
            acc = out.setdefault(signal, [0, 0])
            acc[0] += trials
            acc[1] += failures
    return {s: Counts(t, f) for s, (t, f) in out.items()}
