"""Eval coverage: does eval traffic exercise the versions users actually get?

background.md's incident: "the eval scorer only sees v47" while most users in a region
got v46. Requests carrying ``evals.header`` are eval traffic: a second
``TrafficCounter`` counts them apart from production (which is what the soak judge,
the production distribution and ``/admin/traffic``'s shares read). ``coverage`` puts
the two side by side per (region, version): a version is *uncovered* when it carried
more than ``evals.min_production_share`` of a region's production requests over
``evals.window_s`` while no eval request was answered by it in that region then.
Pure: both windows are read by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.telemetry.traffic import Window


@dataclass(frozen=True, slots=True)
class Coverage:
    region: str
    version_key: str
    production_requests: int
    production_share: float  # of the region's production requests in the window
    eval_requests: int
    uncovered: bool  # over the share, and no eval request exercised it


def coverage(production: Window, evals: Window, min_share: float) -> list[Coverage]:
    """One row per (region, version) seen in either window, sorted."""
    prod = production.by_region()
    tried = evals.by_region()
    out: list[Coverage] = []
    for region in sorted(set(prod) | set(tried)):
        counts = prod.get(region, {})
        total = sum(counts.values())
        evaluated = tried.get(region, {})
        for key in sorted(set(counts) | set(evaluated)):
            n = counts.get(key, 0)
            share = n / total if total else 0.0
            exercised = evaluated.get(key, 0)
            out.append(Coverage(region, key, n, share, exercised,
                                uncovered=share > min_share and exercised == 0))
    return out
