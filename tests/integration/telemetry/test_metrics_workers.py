"""``pinproxy serve --workers 2``: /metrics reports the sum over both workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import orjson

from tests.fixtures.proxy import ProxyProcess, free_port
from tests.fixtures.sim import StartPop
from tests.integration.telemetry.test_metrics import L, Samples, parse_samples, series

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}
REQUESTS = 24


def _log_lines(proxy: ProxyProcess) -> list[dict[str, object]]:
    lines = []
    for raw in proxy.log_path.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            lines.append(orjson.loads(raw))
    return lines


async def _until(check: Callable[[], bool], proxy: ProxyProcess, what: str,
                 timeout: float = 30.0) -> None:
    await proxy.until(check, what, timeout)


async def _scrape(admin_url: str) -> Samples:
    # A fresh connection each time: any worker may answer, and each must tell the sum.
    async with aiohttp.ClientSession() as fresh, fresh.get(f"{admin_url}/metrics") as resp:
        assert resp.status == 200
        return parse_samples(await resp.text())


async def test_metrics_are_summed_over_workers_and_gauges_are_not(
    start_pop: StartPop, proxy_processes: Callable[..., ProxyProcess], redis_url: str,
) -> None:
    pop = await start_pop("us-east-1", "us-east", "v47")
    admin_port = free_port()
    proxy = proxy_processes(
        f'[listen]\nhost = "127.0.0.1"\nshutdown_timeout_s = 5\n'
        f'[store]\nkind = "redis"\nurl = "{redis_url}"\ntouch_interval_s = 0.1\n'
        f'[discovery]\ninterval_s = 0.2\n'
        f'[log]\nlevel = "info"\nformat = "json"\n'
        f'[admin]\nport = {admin_port}\n'
        f'[[backends]]\nid = "us-east-1"\nregion = "us-east"\nurl = "{pop.url}"\n',
        "--workers", "2",
    )
    admin_url = f"http://127.0.0.1:{admin_port}"

    def listening_workers() -> set[object]:
        return {line.get("worker") for line in _log_lines(proxy)
                if str(line.get("message", "")).startswith("admin API listening")}

    # Both workers accept before any traffic, so the kernel spreads it over both.
    await _until(lambda: listening_workers() == {0, 1}, proxy, "both workers listening")

    statuses = []
    for i in range(REQUESTS):
        # force_close: a new connection per request, which SO_REUSEPORT hashes to a worker.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as fresh, fresh.post(
            f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"X-Session-ID": f"s{i}"}
        ) as resp:
            await resp.read()
            statuses.append(resp.status)
    assert statuses == [200] * REQUESTS

    def served_by() -> list[object]:
        return [line.get("worker") for line in _log_lines(proxy)
                if line.get("logger") == "pinproxy.requests"]

    await _until(lambda: len(served_by()) == REQUESTS, proxy, "a log line per request")
    per_worker = {w: served_by().count(w) for w in (0, 1)}
    assert per_worker[0] > 0, per_worker
    assert per_worker[1] > 0, per_worker

    # Pinned-session counts come from the store, which records pins in batches.
    deadline = time.monotonic() + 10
    pinned = L(version_key="prompt=v47", prompt_version="v47")
    while series(await _scrape(admin_url), "pinproxy_pinned_sessions").get(pinned) != REQUESTS:
        assert time.monotonic() < deadline, proxy.log()
        await asyncio.sleep(0.1)

    for _ in range(6):
        samples = await _scrape(admin_url)
        assert series(samples, "pinproxy_requests_total") == {
            L(prompt_version="v47", version_key="prompt=v47", region="us-east",
              backend="us-east-1", status_class="2xx"): REQUESTS,
        }
        assert series(samples, "pinproxy_pins_created_total") == {
            L(version_key="prompt=v47"): REQUESTS,
        }
        assert series(samples, "pinproxy_request_duration_seconds_count") == {
            L(prompt_version="v47", region="us-east"): REQUESTS,
        }
        # Fleet gauges come from the answering worker alone: one version, not two.
        assert series(samples, "pinproxy_versions_serving") == {(): 1}
        assert series(samples, "pinproxy_version_backends") == {
            L(version_key="prompt=v47", prompt_version="v47", region="us-east"): 1,
        }
        assert series(samples, "pinproxy_pinned_sessions") == {pinned: REQUESTS}
        # Each worker judges health on its own, so each counted the backend coming up.
        assert series(samples, "pinproxy_backend_health_transitions_total") == {
            L(backend="us-east-1", region="us-east", to="healthy"): 2,
            L(backend="us-east-1", region="us-east", to="unhealthy"): 0,  # from the start
        }
        # Each worker's loop-lag timer ticks every 50 ms and the two are summed.
        lag = series(samples, "pinproxy_event_loop_lag_seconds_count")
        assert set(lag) == {()}
        assert lag[()] > 2
        # Each worker reports at least the full collection that freezing start-up runs.
        gc_pauses = series(samples, "pinproxy_gc_pause_seconds_count")
        assert gc_pauses.get(L(generation="2"), 0) >= 2, gc_pauses
    assert proxy.stop() == 0
