"""Series that exist from the start, process_* metrics, and the separate metrics listener."""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp
import pytest

from proxy.config.settings import settings_from_mapping
from proxy.core.errors import ConfigError
from tests.fixtures.proxy import ProxyProcess, StartProxy, free_port, proxy_config
from tests.fixtures.sim import StartPop
from tests.integration.telemetry.test_metrics import L, parse_samples, scrape, series

TOKEN = "metrics-test-token-0123456789abcdef"
CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}


async def test_series_with_known_labels_are_exported_at_zero_before_any_event(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    a = await start_pop("pop-a", "r1", "v1")
    b = await start_pop("pop-b", "r2", "v1")
    reloaded = proxy_config([a, b])
    proxy = await start_proxy([a], reload_from=lambda: settings_from_mapping(reloaded))
    samples = await scrape(http, proxy.admin_url)
    assert series(samples, "pinproxy_audit_dropped_total") == {
        L(reason="queue_full"): 0, L(reason="write_failed"): 0,
    }
    assert series(samples, "pinproxy_upstream_retries_total") == {
        L(reason=r): 0 for r in ("connect", "dropped", "version_mismatch", "refused")
    }
    assert series(samples, "pinproxy_lost_pins_total") == {
        L(action="refuse"): 0, L(action="mark"): 0,
    }
    assert series(samples, "pinproxy_outlier_ejections_total") == {
        L(backend="pop-a", region="r1"): 0,
    }
    bad = series(samples, "pinproxy_bad_http_requests_total")
    assert len(bad) == 16  # 8 reasons on each of the data and admin listeners
    assert set(bad.values()) == {0}
    assert series(samples, "pinproxy_pin_store_errors_total") == {
        L(operation=o): 0 for o in ("get", "pin_if_absent", "repin")
    }
    # A backend a reload adds gets its series at once too.
    async with http.post(f"{proxy.admin_url}/admin/reload") as resp:
        assert resp.status == 200
    samples = await scrape(http, proxy.admin_url)
    assert series(samples, "pinproxy_outlier_ejections_total") == {
        L(backend="pop-a", region="r1"): 0, L(backend="pop-b", region="r2"): 0,
    }


async def test_process_metrics_are_exported(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy([await start_pop()])
    samples = await scrape(http, proxy.admin_url)
    (started,) = series(samples, "process_start_time_seconds").values()
    assert time.time() - 3600 < started <= time.time()
    (rss,) = series(samples, "process_resident_memory_bytes").values()
    assert rss > 1_000_000
    assert series(samples, "process_open_fds")
    assert series(samples, "python_info")


def test_the_metrics_port_must_not_collide_or_float_with_workers() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.port must differ"):
        settings_from_mapping({"listen": {"port": 8080}, "metrics": {"port": 8080}})
    with pytest.raises(ConfigError, match=r"metrics\.port must be fixed"):
        settings_from_mapping({"listen": {"workers": 2}, "store": {"kind": "redis"},
                               "metrics": {"port": 0}})
    assert settings_from_mapping({"metrics": {"port": 9100}}).metrics.host == "0.0.0.0"


async def _get(url: str, **headers: str) -> tuple[int, str, str]:
    # A fresh connection each time: with several workers any of them may answer.
    async with aiohttp.ClientSession() as fresh, fresh.get(url, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def test_a_separate_metrics_listener_serves_metrics_without_the_admin_token(
    start_pop: StartPop, proxy_processes: Callable[..., ProxyProcess], redis_url: str
) -> None:
    pop = await start_pop("us-east-1", "us-east", "v47")
    admin_port, metrics_port = free_port(), free_port()
    proxy = proxy_processes(
        f'[listen]\nhost = "127.0.0.1"\nshutdown_timeout_s = 5\n'
        f'[store]\nkind = "redis"\nurl = "{redis_url}"\n'
        f'[log]\nlevel = "info"\nformat = "json"\n'
        f'[admin]\nport = {admin_port}\ntoken = "{TOKEN}"\n'
        f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}\n'
        f'[[backends]]\nid = "us-east-1"\nregion = "us-east"\nurl = "{pop.url}"\n',
        "--workers", "2",
    )
    await proxy.until(lambda: proxy.log(tail=None).count("metrics listening on") == 2,
                      "both workers' metrics listeners")
    for i in range(6):
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as fresh, fresh.post(
            f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"X-Session-ID": f"s{i}"}
        ) as resp:
            assert resp.status == 200
            await resp.read()
    metrics_url = f"http://127.0.0.1:{metrics_port}"
    for _ in range(4):  # whichever worker answers
        status, content_type, text = await _get(f"{metrics_url}/metrics")
        assert status == 200
        assert content_type.startswith("text/plain")
        samples = parse_samples(text)
        assert sum(series(samples, "pinproxy_requests_total").values()) == 6
        assert series(samples, "process_start_time_seconds")
        assert series(samples, "process_resident_memory_bytes")
        assert series(samples, "pinproxy_audit_dropped_total")[L(reason="queue_full")] == 0
    # It serves nothing else, and the admin listener still wants its token.
    status, content_type, text = await _get(f"{metrics_url}/admin/backends")
    assert (status, content_type) == (404, "application/json")
    assert '"code":"not_found"' in text.replace(" ", "")
    status, _, _ = await _get(f"http://127.0.0.1:{admin_port}/metrics")
    assert status == 401
    status, _, _ = await _get(f"http://127.0.0.1:{admin_port}/metrics",
                              Authorization=f"Bearer {TOKEN}")
    assert status == 200
