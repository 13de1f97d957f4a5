"""Percentile math on exact samples, and the small summaries the reports use.

Samples are kept exactly (an ``array('d')`` of seconds costs 8 bytes each, so a 60 s
run at 10k requests/s is under 5 MB): nearest-rank percentiles on exact data are
what HdrHistogram approximates, without its bucket error.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values; NaN when there are none."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * n))
    return sorted_values[min(rank, n) - 1]


def summarize_ms(samples_s: Iterable[float], ps: Sequence[float] = PERCENTILES) -> dict[str, float]:
    """``{"count", "mean_ms", "p50_ms", ..., "max_ms"}`` of latencies given in seconds."""
    values = sorted(samples_s)
    out: dict[str, float] = {"count": len(values)}
    if not values:
        return out
    out["mean_ms"] = round(1000 * statistics.fmean(values), 4)
    for p in ps:
        out[f"p{_label(p)}_ms"] = round(1000 * percentile(values, p), 4)
    out["max_ms"] = round(1000 * values[-1], 4)
    return out


def _label(p: float) -> str:
    return str(int(p)) if p == int(p) else str(p).replace(".", "")


def median_spread(values: Sequence[float]) -> dict[str, float]:
    """Median with min, max and the interquartile range, for per-round numbers."""
    clean = sorted(v for v in values if not math.isnan(v))
    if not clean:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "iqr": math.nan}
    q1 = percentile(clean, 25)
    q3 = percentile(clean, 75)
    return {
        "median": round(statistics.median(clean), 4),
        "min": round(clean[0], 4),
        "max": round(clean[-1], 4),
        "iqr": round(q3 - q1, 4),
    }


def subsample(values: Sequence[float], limit: int, seed: int = 0) -> list[float]:
    """At most ``limit`` values, uniformly chosen, for raw-data files and plots."""
    if len(values) <= limit:
        return list(values)
    return random.Random(seed).sample(list(values), limit)


def as_us(values: Iterable[float]) -> list[int]:
    """Seconds to whole microseconds (compact raw data)."""
    return [round(v * 1e6) for v in values]


def fmt(value: object, digits: int = 2) -> str:
    """A number for a markdown table: NaN and None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], digits: int = 2) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


def counts_line(counts: Mapping[str, object]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"
