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


def _binom_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(max(k, -1) + 1)) / float(2**n)


def sign_test_p(above: int, below: int) -> float:
    """Two-sided exact sign test: how likely a split at least this uneven is when each
    pair is equally likely to land above or below (ties dropped beforehand)."""
    n = above + below
    if n == 0:
        return 1.0
    return min(1.0, 2 * _binom_cdf(min(above, below), n))


def median_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """Distribution-free interval for the median (the sign test's): the k-th smallest and
    k-th largest values, k as large as keeps the coverage at least ``confidence``.
    Returns ``(low, high, exact coverage)``; with too few values, the full range."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return (math.nan, math.nan, 0.0)
    # The median lies below ordered[k] only when at most k values fall below it, and
    # likewise above: [ordered[k], ordered[n - 1 - k]] covers it with probability
    # 1 - 2 P(X <= k), X ~ Binomial(n, 1/2).
    k = 0
    while k + 1 <= n - 2 - k and 1 - 2 * _binom_cdf(k + 1, n) >= confidence:
        k += 1
    return (ordered[k], ordered[n - 1 - k], 1 - 2 * _binom_cdf(k, n))


def bootstrap_median_interval(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median (seeded, so a report is reproducible)."""
    if not values:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    data = list(values)
    medians = sorted(statistics.median(rng.choices(data, k=len(data))) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return (percentile(medians, 100 * tail), percentile(medians, 100 * (1 - tail)))


def paired_ratios(values: Sequence[float], confidence: float = 0.95) -> dict[str, float | int]:
    """Summary of per-pair ratios (B over A, each pair measured back to back): the median,
    its sign-test and bootstrap intervals, and the sign test of "B is no different"
    (ratio 1)."""
    above = sum(1 for v in values if v > 1)
    below = sum(1 for v in values if v < 1)
    low, high, coverage = median_interval(values, confidence)
    boot_low, boot_high = bootstrap_median_interval(values, confidence)
    return {
        "pairs": len(values),
        "median": round(statistics.median(values), 4) if values else math.nan,
        "sign_low": round(low, 4),
        "sign_high": round(high, 4),
        "sign_coverage": round(coverage, 4),
        "bootstrap_low": round(boot_low, 4),
        "bootstrap_high": round(boot_high, 4),
        "b_higher": above,
        "b_lower": below,
        "sign_test_p": round(sign_test_p(above, below), 4),
    }
