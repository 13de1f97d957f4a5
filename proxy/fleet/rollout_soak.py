"""The soak's bookkeeping: what each version did in each region since its region flipped.

Theory of operation
-------------------
``SoakCounter`` is a request observer: per (region, version) it counts answered
requests and their failures (5xx and gateway errors; structured-output failures among
requests that asked for JSON), stamped with each request's arrival time, in a
``proxy.core.soak.SoakLedger``; eval results pushed through the admin API are counted
at their push time. Eval traffic (``evals.header``) is not production and is not
counted: its verdict comes through the pushed results.

``SoakBook`` turns that into the judge's two sides for a soaking region: the new
version in that region, against the previous version everywhere, both counted over
``[flip, now]``, where the flip is the instant of the compare-and-set that made the
new version current (``RegionState.since``). The baseline (what came before the flip)
is taken from the ledger once, the first time this replica judges the soak, by the
flip's timestamp and not by when this replica heard of it, so what was answered or
pushed between the flip and the first judgement counts as evidence.

Each replica judges what it proxied itself; a regression found by any of them halts
the rollout for all (proxy/fleet/rollout_control.py). A replica's false-alarm rate is
the rule's ``alpha``; the fleet's is at most replicas x alpha.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.core.soak import Counts, Signal, SoakLedger

if TYPE_CHECKING:
    from collections.abc import Mapping

    from proxy.core.clock import Clock
    from proxy.core.events import RequestEvent
    from proxy.core.rollout import RegionState

# How far back a replica can place a flip it hears of late (a quiet store, a lagging
# check), beyond which its baseline falls back to when it heard.
MIN_HORIZON_S = 60.0


class SoakCounter:
    """A RequestObserver: trials and failures per (region, version, signal)."""

    def __init__(self, clock: Clock, *, check_interval_s: float = 1.0) -> None:
        self._clock = clock
        self._ledger = SoakLedger(born=clock.time(),
                                  horizon_s=max(MIN_HORIZON_S, 10 * check_interval_s))

    @property
    def ledger(self) -> SoakLedger:
        return self._ledger

    def observe(self, event: RequestEvent) -> None:
        if event.backend_id is None or event.region is None or event.version_key is None:
            return
        if event.eval_run:
            return  # eval traffic is not production: its verdict comes through push_evals
        failed = event.status >= 500 or event.error_type in ("upstream_error", "upstream_timeout")
        ledger = self._ledger
        ledger.add(event.at, event.region, event.version_key, "errors", 1, int(failed))
        if event.structured_output_valid is not None:
            ledger.add(event.at, event.region, event.version_key, "structured_output", 1,
                       int(not event.structured_output_valid))

    def push_evals(self, region: str, version: str, passed: int, failed: int) -> None:
        """An eval system's results for a version in a region, counted now."""
        self._ledger.add(self._clock.time(), region, version, "evals", passed + failed,
                         failed)

    def totals(self, version: str, region: str | None = None) -> dict[Signal, Counts]:
        """Counts of ``version`` in ``region`` (every region: None)."""
        return self._ledger.totals(version, region)

    def __repr__(self) -> str:
        return f"SoakCounter({self._ledger!r})"


@dataclass(frozen=True, slots=True)
class Soak:
    """A soak's baselines: the counts before its flip, to subtract."""

    version: str
    previous: str
    since: float
    new_base: Mapping[Signal, Counts]
    old_base: Mapping[Signal, Counts]
    exact: bool  # False: the flip was older than the ledger's horizon when first seen


@dataclass(frozen=True, slots=True)
class Sides:
    """What the judge compares for one soaking region."""

    new: dict[Signal, Counts]
    old: dict[Signal, Counts]
    exact: bool


class SoakBook:
    """The soaks this replica is judging, by region, and their baselines."""

    def __init__(self, ledger: SoakLedger) -> None:
        self._ledger = ledger
        self._soaks: dict[str, Soak] = {}

    def sides(self, region: str, rs: RegionState) -> Sides | None:
        """The judge's two sides for ``region`` (None: it is not soaking)."""
        if not rs.soaking or rs.previous is None:
            self._soaks.pop(region, None)
            return None
        soak = self._soaks.get(region)
        if soak is None or (soak.version, soak.previous, soak.since) != (
                rs.current, rs.previous, rs.since):
            new = self._ledger.before(rs.since, rs.current, region)
            old = self._ledger.before(rs.since, rs.previous)
            soak = self._soaks[region] = Soak(rs.current, rs.previous, rs.since, new.counts,
                                              old.counts, new.exact and old.exact)
        ledger = self._ledger
        return Sides(_minus(ledger.totals(rs.current, region), soak.new_base),
                     _minus(ledger.totals(rs.previous), soak.old_base), soak.exact)

    def forget(self, regions: set[str]) -> None:
        """Drop the soaks of regions that no longer exist."""
        for region in [r for r in self._soaks if r not in regions]:
            del self._soaks[region]

    def __repr__(self) -> str:
        return f"SoakBook(soaking={sorted(self._soaks)})"


def _minus(now: Mapping[Signal, Counts], base: Mapping[Signal, Counts]) -> dict[Signal, Counts]:
    return {signal: c - base.get(signal, Counts()) for signal, c in now.items()}
