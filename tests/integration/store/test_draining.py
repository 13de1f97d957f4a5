"""Session-aware draining over real sockets: per version, the sessions still active and
when its last pin expires, shared by replicas through a real Redis (or one process
with the memory store), in GET /admin/versions and /metrics."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.sim import StartPop
from tests.integration.admin.fleet_helpers import eventually

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
V46 = "prompt=v46"
WINDOW_S = 1.5
TTL_S = 3600.0


async def ask(http: aiohttp.ClientSession, proxy: RunningProxy, session: str) -> None:
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers={"X-Session-ID": session}) as resp:
        assert resp.status == 200, await resp.text()


async def version(http: aiohttp.ClientSession, proxy: RunningProxy, key: str) -> dict[str, Any]:
    async with http.get(f"{proxy.admin_url}/admin/versions", headers=proxy.admin_headers) as r:
        assert r.status == 200
        view = await r.json()
    assert view["active_window_s"] == WINDOW_S
    return next(v for v in view["versions"] if v["version_key"] == key)


async def metric(http: aiohttp.ClientSession, proxy: RunningProxy, name: str) -> float | None:
    async with http.get(f"{proxy.admin_url}/metrics", headers=proxy.admin_headers) as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(f'{name}{{prompt_version="v46",version_key="{V46}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.parametrize("store", ["redis", "memory"])
async def test_versions_show_active_sessions_and_when_the_last_pin_expires(
    store: str, start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    pop = await start_pop("eu-1", "eu", "v46")
    sections: dict[str, Any] = {
        "versions": {"active_window_s": WINDOW_S},
        "store": {"touch_interval_s": 0.1, "pin_ttl_s": TTL_S},
    }
    url = redis_url if store == "redis" else None
    replicas = [await start_proxy([pop], url, **sections)
                for _ in range(2 if store == "redis" else 1)]
    first, last = replicas[0], replicas[-1]
    sessions = [f"s{i}" for i in range(5)]
    for i, session in enumerate(sessions):  # spread over the replicas
        await ask(http, replicas[i % len(replicas)], session)
    used_by = time.time()

    async def all_active() -> bool:
        entry = await version(http, first, V46)
        return bool(entry["active_sessions"] == len(sessions))

    # With Redis: the other replica's sessions arrive with its touch batch.
    await eventually(all_active, within_s=10, what="all_active")
    entry = await version(http, first, V46)
    assert entry["pinned_sessions"] == len(sessions)
    assert entry["last_used_at"] <= used_by + 1
    assert entry["last_pin_expires_at"] == pytest.approx(entry["last_used_at"] + TTL_S)
    assert await metric(http, last, "pinproxy_version_active_sessions") == len(sessions)
    expiry = await metric(http, last, "pinproxy_version_last_pin_expiry_timestamp_seconds")
    assert expiry == pytest.approx(entry["last_pin_expires_at"], abs=1)

    async def all_idle() -> bool:  # nobody spoke for the window: capacity may go
        return bool((await version(http, first, V46))["active_sessions"] == 0)

    await eventually(all_idle, within_s=10, what="all_idle")
    idle = await version(http, first, V46)
    assert idle["pinned_sessions"] == len(sessions)  # still pinned, just not active
    assert idle["last_pin_expires_at"] == pytest.approx(entry["last_pin_expires_at"])
    assert await metric(http, last, "pinproxy_version_active_sessions") == 0

    await ask(http, last, sessions[0])  # one conversation resumes, on any replica

    async def one_active() -> bool:
        return bool((await version(http, first, V46))["active_sessions"] == 1)

    await eventually(one_active, within_s=10, what="one_active")
    resumed = await version(http, first, V46)
    assert resumed["last_pin_expires_at"] > entry["last_pin_expires_at"]
