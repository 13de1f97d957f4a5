"""config/prometheus-alerts.yml: valid for promtool, its unit tests pass, its metrics exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.proxy import StartProxy
from tests.fixtures.sim import StartPop
from tests.integration.telemetry.test_metrics import exposed_metric_names, wait_for

CONFIG = Path(__file__).resolve().parents[3] / "config"
RULES = CONFIG / "prometheus-alerts.yml"
RULE_TESTS = CONFIG / "prometheus-alerts.test.yml"
INSTALL_HINT = (
    "promtool not found on PATH: install Prometheus's promtool, e.g. "
    "`apt-get install prometheus` on Debian/Ubuntu (.ci/run does this)"
)
# Metric names in PromQL: ours, plus the recording rules the file defines.
_NAME = re.compile(r"\bpinproxy[_:][a-z0-9_:]+")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60,
                          check=False, cwd=CONFIG)


def test_promtool_checks_the_rules() -> None:
    done = _promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 19 rules found" in done.stdout


def test_rule_unit_tests_fire_and_stay_quiet() -> None:
    done = _promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alerted_kind_is_covered() -> None:
    text = RULES.read_text()
    alerts = re.findall(r"- alert: (\w+)", text)
    assert alerts == [
        "PinproxyMultipleVersionsServing",
        "PinproxyRegionVersionSkew",
        "PinproxySessionVersionSwitch",
        "PinproxyMismatchGuardTriggered",
        "PinproxyIntentRuntimeDrift",
        "PinproxyPinnedVersionWithoutBackend",
        "PinproxyVersionUnavailableResponses",
        "PinproxyStructuredOutputErrorsAboveOtherVersion",
        "PinproxyPinStoreErrors",
        "PinproxyRedisCallErrors",
        "PinproxyAuditRecordsDropped",
        "PinproxyEventLoopStalled",
        "PinproxyShedding",
        "PinproxyKillSwitchTripped",
        "PinproxyRolloutHalted",
        "PinproxyRolloutHeldBack",
        "PinproxyEvalCoverageGap",
    ]
    # Each alert has a test that expects it to fire.
    tested = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels",
                            RULE_TESTS.read_text()))
    assert tested == set(alerts)


async def test_rules_only_use_metrics_the_proxy_exports(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    await wait_for(lambda: bool(proxy.registry.snapshot.serving_keys()))
    exported = await exposed_metric_names(http, proxy)
    text = RULES.read_text()
    recorded = set(re.findall(r"record: (\S+)", text))
    used = set(_NAME.findall(text)) - recorded
    assert used
    assert used <= exported, sorted(used - exported)
