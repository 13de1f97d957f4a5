"""The soak ledger (proxy/core/soak.py): what came before an instant, by arrival time, so
the judge's window starts at the flip's timestamp, not when a replica first judged it."""

from __future__ import annotations

import math

from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.core.soak import RESOLUTION_S, Counts, SoakLedger

T0 = 1_700_000_000.0
V46, V47 = "prompt=v46", "prompt=v47"

# Each observation: (seconds after T0, failed).
observations = st.lists(st.tuples(st.floats(0, 120, allow_nan=False), st.booleans()),
                        max_size=60)


def _tick(at: float) -> int:
    return math.floor(at / RESOLUTION_S)


@settings(max_examples=300, deadline=None)
@given(seen=observations, flip=st.floats(0, 120, allow_nan=False))
# The bug this pins: a failure answered after the flip, before any replica judged the
# soak, was counted in the baseline (the counts at the first judgement).
@example(seen=[(10.0, False), (30.5, True)], flip=30.0)
# Requests finish out of order: one that arrived after the flip is counted before
# one that arrived before it.
@example(seen=[(31.0, True), (29.0, False)], flip=30.0)
def test_what_came_before_an_instant_is_exact_to_the_bucket(
    seen: list[tuple[float, bool]], flip: float
) -> None:
    ledger = SoakLedger(born=T0 - 1, horizon_s=600)
    for offset, failed in seen:
        ledger.add(T0 + offset, "eu", V47, "errors", 1, int(failed))
    before = ledger.before(T0 + flip, V47, "eu")
    assert before.exact
    early = [failed for offset, failed in seen if _tick(T0 + offset) < _tick(T0 + flip)]
    assert before.counts.get("errors", Counts()) == (
        Counts(len(early), sum(early)) if early else Counts())
    # What the judge sees: everything minus the baseline, i.e. what came at or after.
    window = ledger.totals(V47, "eu").get("errors", Counts()) - before.counts.get(
        "errors", Counts())
    late = [failed for offset, failed in seen if _tick(T0 + offset) >= _tick(T0 + flip)]
    assert window == Counts(len(late), sum(late))


def test_a_replica_started_after_the_flip_has_no_baseline() -> None:
    ledger = SoakLedger(born=T0 + 50, horizon_s=60)
    ledger.add(T0 + 51, "eu", V47, "errors", 1, 1)
    assert ledger.before(T0 + 10, V47, "eu").counts == {}
    assert ledger.before(T0 + 10, V47, "eu").exact


def test_a_flip_older_than_the_horizon_falls_back_to_everything_counted_and_says_so() -> None:
    ledger = SoakLedger(born=T0, horizon_s=60)
    ledger.add(T0 + 1, "eu", V47, "errors", 1, 0)
    ledger.add(T0 + 100, "eu", V47, "errors", 1, 1)  # prunes the bucket at T0 + 1
    ledger.add(T0 + 0.5, "eu", V47, "errors", 1, 0)  # late, older than anything kept
    before = ledger.before(T0 + 2, V47, "eu")
    assert not before.exact
    assert before.counts == {"errors": Counts(3, 1)}
    assert ledger.before(T0 + 99, V47, "eu") == ledger.before(T0 + 99, V47, "eu")
    assert ledger.before(T0 + 99, V47, "eu").exact
