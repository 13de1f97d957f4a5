"""eval_coverage.coverage: a version users get in a region, with no eval traffic there."""

from __future__ import annotations

from proxy.telemetry.eval_coverage import Coverage, coverage
from proxy.telemetry.traffic import Window


def window(counts: dict[tuple[str, str], int]) -> Window:
    return Window(0.0, 60.0, counts)


def test_a_version_over_the_share_without_evals_is_uncovered_and_nothing_else_is() -> None:
    production = window({("eu", "v46"): 90, ("eu", "v47"): 10, ("us", "v47"): 4,
                         ("us", "v48"): 96})
    evals = window({("eu", "v47"): 3, ("us", "v48"): 1, ("ap", "v47"): 2})
    rows = {(c.region, c.version_key): c for c in coverage(production, evals, 0.05)}
    assert rows[("eu", "v46")] == Coverage("eu", "v46", 90, 0.9, 0, uncovered=True)
    assert rows[("eu", "v47")] == Coverage("eu", "v47", 10, 0.1, 3, uncovered=False)
    assert not rows[("us", "v47")].uncovered  # 4% of us: under the share
    assert rows[("us", "v48")] == Coverage("us", "v48", 96, 0.96, 1, uncovered=False)
    # Evals in a region without production traffic are listed, never uncovered.
    assert rows[("ap", "v47")] == Coverage("ap", "v47", 0, 0.0, 2, uncovered=False)
    # At 95% only us/v48 is over the share, and evals exercised it.
    assert not any(c.uncovered for c in coverage(production, evals, 0.95))


def test_the_share_must_be_exceeded_not_met() -> None:
    production = window({("eu", "v46"): 5, ("eu", "v47"): 95})
    rows = coverage(production, window({}), 0.05)
    assert [(c.version_key, c.uncovered) for c in rows] == [("v46", False), ("v47", True)]
