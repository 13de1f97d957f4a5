"""config/grafana-dashboard.json: a loadable dashboard whose queries parse and exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fixtures.proxy import StartProxy
from tests.fixtures.sim import StartPop
from tests.integration.telemetry.test_alert_rules import RULES, _promtool
from tests.integration.telemetry.test_metrics import exposed_metric_names, wait_for

DASHBOARD = Path(__file__).resolve().parents[3] / "config" / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_NAME = re.compile(r"\bpinproxy[_:][a-z0-9_:]+")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel.get("targets", ())]


def test_dashboard_model_is_what_grafana_loads(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "pinproxy-versions"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["schemaVersion"] >= 36
    assert "id" not in dashboard or dashboard["id"] is None  # importable anywhere
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("prompt_version", "region"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
        assert variables[name]["definition"] == f"label_values(pinproxy_requests_total, {name})"
        assert variables[name]["includeAll"] is True

    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(grid["x"] + dx, grid["y"] + dy)
                 for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat", "table"), panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs, panel["title"]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE
            assert target["expr"].strip()


def test_required_splits_by_prompt_version_and_region(dashboard: dict[str, Any]) -> None:
    by_title: dict[str, str] = {}
    for title, expr in _queries(dashboard):
        by_title.setdefault(title, expr)  # a panel's first query is its main one
    for title, metric in (
        ("Requests / s", "pinproxy_requests_total"),
        ("Error ratio (5xx)", "pinproxy_requests_total"),
        ("Request duration p95", "pinproxy_request_duration_seconds_bucket"),
        ("Time to first byte p95", "pinproxy_time_to_first_byte_seconds_bucket"),
        ("Tokens / s", "pinproxy_tokens_total"),
        ("Structured-output error ratio", "pinproxy_structured_output_errors_total"),
    ):
        expr = by_title[title]
        assert metric in expr
        assert "by (" in expr
        assert "prompt_version, region" in expr, title
        assert 'prompt_version=~"$prompt_version", region=~"$region"' in expr, title
    assert "by (region)" in by_title["Versions serving per region"]
    assert "pinproxy_region_versions_serving" in by_title["Versions serving per region"]


def test_every_query_parses(dashboard: dict[str, Any], tmp_path: Path) -> None:
    # promtool parses PromQL when checking rules: each query becomes a recording rule,
    # with Grafana's variables replaced by what Grafana would send.
    rules = [
        {"record": f"dashboard:query_{i}",
         "expr": expr.replace("$__rate_interval", "5m").replace('"$prompt_version"', '".*"')
         .replace('"$region"', '".*"')}
        for i, (_, expr) in enumerate(_queries(dashboard))
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = _promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


async def test_every_metric_in_a_query_exists(
    dashboard: dict[str, Any],
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    await wait_for(lambda: bool(proxy.registry.snapshot.serving_keys()))
    known = await exposed_metric_names(http, proxy)
    known |= set(re.findall(r"record: (\S+)", RULES.read_text()))
    used = {name for _, expr in _queries(dashboard) for name in _NAME.findall(expr)}
    assert len(used) > 15
    assert used <= known, sorted(used - known)


def test_no_panel_draws_a_region_for_pinproxys_own_answers(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    # pinproxy's own 503s have region="": a query split by region must leave them out
    # (they are drawn as one series per prompt version instead), else Grafana draws a
    # phantom region with an empty name.
    by_region = [
        (panel["title"], target) for panel in dashboard["panels"]
        for target in panel.get("targets", ())
        if "{{region}}" in target.get("legendFormat", "")
        and ("pinproxy_requests_total" in target["expr"]
             or "pinproxy_request_duration_seconds" in target["expr"])
    ]
    assert len(by_region) >= 3
    for title, target in by_region:
        assert 'region!=""' in target["expr"], title
    # And evaluated on such series, the 5xx panel gives no empty region.
    panel = next(p for p in dashboard["panels"] if p["title"] == "Error ratio (5xx)")
    exprs = [t["expr"].replace("$__rate_interval", "5m").replace('"$prompt_version"', '".*"')
             .replace('"$region"', '".*"') for t in panel["targets"]]
    rules = tmp_path / "panel.yml"
    rules.write_text(json.dumps({"groups": [{"name": "panel", "rules": [
        {"record": f"panel:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}))
    series = [
        ('pinproxy_requests_total{prompt_version="v46", region="ap-south", status_class="2xx"}',
         "0+9x20"),
        ('pinproxy_requests_total{prompt_version="v46", region="ap-south", status_class="5xx"}',
         "0+1x20"),
        ('pinproxy_requests_total{prompt_version="v46", region="", status_class="5xx"}',
         "0+10x20"),
    ]
    test = tmp_path / "panel.test.yml"
    test.write_text(json.dumps({"rule_files": [rules.name], "evaluation_interval": "1m",
        "tests": [{"interval": "1m",
                   "input_series": [{"series": s, "values": v} for s, v in series],
                   "promql_expr_test": [
                       {"expr": "round(100 * panel:query_0)", "eval_time": "10m",
                        "exp_samples": [{"labels": '{prompt_version="v46", region="ap-south"}',
                                         "value": 10}]},
                       {"expr": "round(100 * panel:query_1)", "eval_time": "10m",
                        "exp_samples": [{"labels": '{prompt_version="v46"}', "value": 50}]},
                   ]}]}))
    done = _promtool("test", "rules", str(test))
    assert done.returncode == 0, done.stdout + done.stderr
