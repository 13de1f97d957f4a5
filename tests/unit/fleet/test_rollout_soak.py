"""The soak's bookkeeping (proxy/fleet/rollout_soak.py): the judge's window is [flip, now]
by the flip's timestamp (the compare-and-set's), not by when this replica first judged."""

from __future__ import annotations

from proxy.core.rollout import RegionState
from proxy.core.soak import Counts, SoakLedger
from proxy.fleet.rollout_soak import SoakBook

T0 = 1_700_000_000.0
V46, V47 = "prompt=v46", "prompt=v47"


def test_the_first_judgement_counts_what_was_answered_since_the_flip_instant() -> None:
    """A transcript: flip at T0+30 (another replica's compare-and-set); this replica
    answers failures from v47 at T0+30.5 and hears of the flip at T0+31."""
    ledger = SoakLedger(born=T0, horizon_s=60)
    for i in range(20):  # v46's history before the flip, in both regions
        ledger.add(T0 + i, "us", V46, "errors", 1, 0)
    ledger.add(T0 + 30.5, "eu", V47, "errors", 5, 5)
    ledger.add(T0 + 30.7, "us", V46, "errors", 5, 0)
    book = SoakBook(ledger)
    soaking = RegionState(current=V47, since=T0 + 30, previous=V46, soaking=True)
    sides = book.sides("eu", soaking)
    assert sides is not None
    assert sides.exact
    assert sides.new == {"errors": Counts(5, 5)}  # evidence, not baseline
    assert sides.old == {"errors": Counts(5, 0)}
    ledger.add(T0 + 32, "eu", V47, "errors", 1, 0)
    later = book.sides("eu", soaking)
    assert later is not None
    assert later.new == {"errors": Counts(6, 5)}
    # The soak passes: the region is dropped, and a new flip gets a new baseline.
    assert book.sides("eu", RegionState(current=V47, since=T0 + 30, previous=V46)) is None
    again = book.sides("eu", RegionState(current=V47, since=T0 + 31.5, previous=V46,
                                         soaking=True))
    assert again is not None
    assert again.new == {"errors": Counts(1, 0)}
    book.forget(set())
    assert repr(book) == "SoakBook(soaking=[])"


def test_evals_pushed_after_the_flip_count_however_late_it_is_judged() -> None:
    ledger = SoakLedger(born=T0, horizon_s=60)
    ledger.add(T0 + 29, "eu", V47, "evals", 100, 0)  # before the flip: baseline
    ledger.add(T0 + 30.01, "eu", V47, "evals", 100, 20)
    book = SoakBook(ledger)
    sides = book.sides("eu", RegionState(current=V47, since=T0 + 30, previous=V46,
                                         soaking=True))
    assert sides is not None
    assert sides.new == {"evals": Counts(100, 20)}
