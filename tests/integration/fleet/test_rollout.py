"""Rollout discipline over real sockets: two pinproxy replicas sharing a real Redis,
simulated POPs whose runtimes flip one by one (issue 12)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from proxy.core.models import VersionBundle
from proxy.sim import SimPop
from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.sim import StartPop

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
JSON_CHAT = {**CHAT, "response_format": {"type": "json_object"}}
V46, V47 = "prompt=v46", "prompt=v47"
FAST = {"interval_s": 0.05, "jitter": 0.0}


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def ask(http: aiohttp.ClientSession, url: str, session: str,
              body: dict[str, Any] = CHAT) -> tuple[int, dict[str, str]]:
    async with http.post(f"{url}/v1/chat/completions", json=body,
                         headers={"X-Session-ID": session}) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


def current(proxy: RunningProxy, region: str) -> str | None:
    rs = proxy.services.rollout.state.regions.get(region)
    return None if rs is None else rs.current


def sees(proxy: RunningProxy, pop: SimPop, key: str) -> bool:
    return proxy.registry.snapshot.by_id[pop.state.backend_id].version_key == key


async def test_a_region_flips_for_new_sessions_only_when_its_last_replica_does(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    eu = [await start_pop(f"eu-{i}", "eu", "v46") for i in range(3)]
    replicas = [await start_proxy(eu, redis_url, discovery=FAST) for _ in range(2)]
    await until(lambda: all(current(p, "eu") == V46 for p in replicas))
    n = 0
    for flipped, pop in enumerate(eu, 1):
        pop.flip(VersionBundle(prompt="v47"))
        await until(lambda pop=pop: all(sees(p, pop, V47) for p in replicas))  # type: ignore[misc]
        if flipped < len(eu):
            for proxy in replicas:
                for _ in range(8):
                    n += 1
                    status, headers = await ask(http, proxy.url, f"new-{n}")
                    assert (status, headers["X-Prompt-Version"]) == (200, "v46"), flipped
    await until(lambda: all(current(p, "eu") == V47 for p in replicas))
    states = [p.services.rollout.state.regions["eu"] for p in replicas]
    assert states[0].since == states[1].since  # one instant, the shared one
    assert states[0].soaking
    for proxy in replicas:
        for _ in range(8):
            n += 1
            status, headers = await ask(http, proxy.url, f"new-{n}")
            assert (status, headers["X-Prompt-Version"]) == (200, "v47")
    flips = [e for p in replicas for e in p.services.rollout.events() if e.kind == "flipped"]
    assert len(flips) == 1  # decided once, by one replica, for both


async def test_per_replica_mode_lets_each_backend_serve_what_it_runs(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    a = await start_pop("eu-a", "eu", "v46", ttfb_ms=30)
    b = await start_pop("eu-b", "eu", "v47")
    proxy = await start_proxy([a, b], rollout={"region_modes": {"eu": "per_replica"}},
                              routing={"initial_latency_ms": 1})
    served = {(await ask(http, proxy.url, f"s{i}"))[1]["X-Prompt-Version"] for i in range(10)}
    assert "v47" in served  # the mixed region is not held to its current version


async def test_a_regressed_version_trips_the_kill_switch_and_sessions_move_back(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    eu = await start_pop("eu-1", "eu", "v46")
    us = await start_pop("us-1", "us", "v46", ttfb_ms=20)  # new sessions prefer eu
    proxy = await start_proxy(
        [eu, us], redis_url, discovery=FAST, routing={"initial_latency_ms": 1},
        rollout={"min_samples": 30, "soak_s": 60, "check_interval_s": 0.1,
                 "on_regression": "block_and_repin"},
    )
    await until(lambda: current(proxy, "eu") == V46 and current(proxy, "us") == V46)
    old_sessions = [f"old-{i}" for i in range(10)]
    for session in old_sessions:  # pinned to v46 before the rollout: the baseline
        assert (await ask(http, proxy.url, session))[0] == 200
    # v47 breaks structured output; it reaches eu only.
    eu.state.json_valid = False
    eu.flip(VersionBundle(prompt="v47"))
    await until(lambda: current(proxy, "eu") == V47)
    exposed: set[str] = set()
    for i in range(300):
        if proxy.services.rollout.state.regions["eu"].halted == V47:
            break
        status, headers = await ask(http, proxy.url, f"new-{i}", JSON_CHAT)
        assert status == 200
        if headers["X-Prompt-Version"] == "v47":
            exposed.add(f"new-{i}")
        status, headers = await ask(http, proxy.url, old_sessions[i % 10], JSON_CHAT)
        assert (status, headers["X-Prompt-Version"]) == (200, "v46")
    else:
        pytest.fail("the kill switch never tripped")
    events = {e.kind: e for e in proxy.services.rollout.events()}
    assert events["regression"].detail["signal"] == "structured_output"
    trials = events["regression"].detail["new_trials"]
    assert isinstance(trials, int)
    assert trials >= 30
    assert events["rolled_back"].region == "eu"
    assert current(proxy, "eu") == V46
    assert "prompt=v47" in proxy.registry.snapshot.blocked_versions
    # Every session that saw v47 is moved back on its next request, and told.
    assert exposed
    for session in exposed:
        status, headers = await ask(http, proxy.url, session)
        assert status == 200
        assert headers["X-Prompt-Version"] == "v46"
        assert headers["X-Prompt-Version-Changed"] == f"{V47} -> {V46}"
    assert proxy.metric("pinproxy_session_version_switches_total", reason="rollback",
                        from_version=V47, to_version=V46) == len(exposed)


async def test_an_operator_rollback_lists_what_still_runs_the_bad_version(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    # The parser-skew case: v47 came with parser p2 in eu and ap, while us kept p1.
    eu = await start_pop("eu-1", "eu", "v46", parser="p2")
    us = await start_pop("us-1", "us", "v46", parser="p1")
    proxy = await start_proxy([eu, us], discovery=FAST)
    await until(lambda: current(proxy, "eu") is not None)
    eu.flip(VersionBundle(prompt="v47", parser="p2"))
    await until(lambda: sees(proxy, eu, "prompt=v47,parser=p2"))
    # Two bundles are current already (the skew), so v47 is a third: held back...
    await until(lambda: proxy.services.rollout.state.regions["eu"].held
                == "previous_rollout_incomplete")
    assert current(proxy, "eu") == "prompt=v46,parser=p2"
    # ...until an operator forces it.
    headers = proxy.admin_headers
    async with http.put(f"{proxy.admin_url}/admin/rollout/regions/eu/current/v47",
                        headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    assert current(proxy, "eu") == "prompt=v47,parser=p2"
    async with http.post(f"{proxy.admin_url}/admin/versions/v47/roll-back-to/v46",
                         headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        result = await resp.json()
    assert [(b["id"], b["target"]) for b in result["backends"]] == [
        ("eu-1", "prompt=v46,parser=p2")]  # eu's own previous bundle, not us's
    assert result["already_there"] == ["us"]
    assert current(proxy, "eu") == "prompt=v46,parser=p2"
    async with http.get(f"{proxy.admin_url}/admin/rollout", headers=headers) as resp:
        view = await resp.json()
    assert {r["region"]: r["state"] for r in view["regions"]} == {"eu": "halted", "us": "steady"}
