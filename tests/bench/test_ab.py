"""``python -m bench ab``: paired runs of two trees, and the statistics it reports.

The statistics are checked against values worked out by hand (binomial tables); the
scenario runs end to end with tiny sizes, one side a copy of this checkout's
``proxy/`` package elsewhere on disk, to show the run really imports the tree it was
given and not the checkout installed in the interpreter.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from bench import ab
from bench.procs import REPO_ROOT, BenchError, proxy_source
from bench.stats import bootstrap_median_interval, median_interval, paired_ratios, sign_test_p


def test_order_alternates_which_tree_goes_first() -> None:
    assert ab.order(3) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]


def test_sign_test_p_values_match_the_binomial_table() -> None:
    assert sign_test_p(5, 5) == 1.0
    assert sign_test_p(10, 0) == pytest.approx(2 / 1024)
    assert sign_test_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert sign_test_p(0, 0) == 1.0


@pytest.mark.parametrize(
    ("n", "low_rank", "coverage"),
    [(10, 2, 1 - 2 * 11 / 1024), (12, 3, 1 - 2 * 79 / 4096), (20, 6, 0.9586105)],
)
def test_median_interval_is_the_sign_tests_order_statistics(
    n: int, low_rank: int, coverage: float
) -> None:
    # Ranks from the binomial table: the widest k with P(X <= k - 1) <= 2.5%.
    low, high, got = median_interval([float(v) for v in range(1, n + 1)])
    assert (low, high) == (low_rank, n + 1 - low_rank)
    assert got == pytest.approx(coverage)
    assert got >= 0.95


def test_median_interval_with_too_few_values_is_the_whole_range() -> None:
    low, high, coverage = median_interval([3.0, 1.0, 2.0])
    assert (low, high) == (1.0, 3.0)
    assert coverage == pytest.approx(0.75)  # below 95%, and said so
    assert math.isnan(median_interval([])[0])


def test_bootstrap_interval_is_reproducible_and_brackets_the_median() -> None:
    values = [0.9, 0.95, 1.0, 1.02, 1.05, 1.1, 1.2]
    first = bootstrap_median_interval(values, seed=3)
    assert first == bootstrap_median_interval(values, seed=3)
    assert first[0] <= 1.02 <= first[1]


def test_paired_ratios_counts_both_directions() -> None:
    summary = paired_ratios([1.1, 1.2, 0.9, 1.0, 1.3])
    assert summary["median"] == 1.1
    assert (summary["b_higher"], summary["b_lower"]) == (3, 1)
    assert summary["sign_test_p"] == pytest.approx(0.625)


def test_summarize_pairs_each_run_with_its_partner() -> None:
    runs = [
        {"pair": 0, "side": "a", "cpu_us": 100.0, "open_cpu_us": 200.0,
         "machine_busy_cores": 1.0, "errors": 0},
        {"pair": 0, "side": "b", "cpu_us": 110.0, "open_cpu_us": 180.0,
         "machine_busy_cores": 1.5, "errors": 0},
        {"pair": 1, "side": "b", "cpu_us": 300.0, "open_cpu_us": None,
         "machine_busy_cores": 2.0, "errors": 1},
        {"pair": 1, "side": "a", "cpu_us": 250.0, "open_cpu_us": None,
         "machine_busy_cores": 2.0, "errors": 0},
    ]  # fmt: skip
    summary = ab.summarize(runs)
    assert summary["ratios"]["ceiling"] == [1.1, 1.2]
    assert summary["ratios"]["open_loop"] == [0.9]  # a pair without an open loop drops out
    assert summary["sides"]["b"]["errors"] == 1
    assert summary["sides"]["a"]["median_cpu_us"] == 175.0


def _copied_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "elsewhere"
    shutil.copytree(REPO_ROOT / "proxy", tree / "proxy",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return tree


def test_proxy_source_is_the_given_tree_or_an_error(tmp_path: Path) -> None:
    tree = _copied_tree(tmp_path)
    assert proxy_source(tree) == tree / "proxy"
    assert proxy_source(None) == REPO_ROOT / "proxy"
    empty = tmp_path / "empty"
    empty.mkdir()
    # Without a proxy/ of its own, the child would run the installed checkout instead.
    with pytest.raises(BenchError, match="would import proxy from"):
        proxy_source(empty)


def test_ab_runs_both_trees_in_alternation_and_reports_ratios(tmp_path: Path) -> None:
    tree = _copied_tree(tmp_path)
    report = ab.run(
        ab.AbConfig(
            a=tree, b=REPO_ROOT, pairs=2, store="memory", duration_s=0.3, levels=(0.5,),
            concurrency=4, sessions=20, out_root=tmp_path / "results",
        )
    )  # fmt: skip
    out = Path(report["out"])
    assert (out / "report.json").is_file()
    assert "median B/A" in (out / "summary.md").read_text()
    assert [(r["pair"], r["side"]) for r in report["runs"]] == ab.order(2)
    sources = {r["side"]: r["proxy_source"] for r in report["runs"]}
    assert sources == {"a": str(tree / "proxy"), "b": str(REPO_ROOT / "proxy")}
    assert report["trees"]["a"]["commit"] is None  # not a git checkout
    assert report["trees"]["b"]["proxy_source"] == str(REPO_ROOT / "proxy")
    ceiling = report["ratio_b_over_a"]["ceiling"]
    assert ceiling["pairs"] == 2
    assert ceiling["median"] > 0
    assert all(r["errors"] == 0 and r["cpu_us"] > 0 for r in report["runs"])


def test_ab_gives_each_side_its_own_settings_on_one_tree(tmp_path: Path) -> None:
    report = ab.run(
        ab.AbConfig(
            a=REPO_ROOT, b=REPO_ROOT, pairs=1, store="memory", duration_s=0.3, levels=(),
            concurrency=4, sessions=20, out_root=tmp_path / "results",
            proxy_set=("log.level='warning'",), b_set=("log.request_log=false",),
        )
    )  # fmt: skip
    given = {r["side"]: r["proxy_set"] for r in report["runs"]}
    assert given == {
        "a": ["log.level='warning'"],
        "b": ["log.level='warning'", "log.request_log=false"],
    }
    assert "`log.request_log=false`" in (Path(report["out"]) / "summary.md").read_text()
