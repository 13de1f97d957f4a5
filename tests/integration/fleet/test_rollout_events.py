"""The fleet's rollout decisions, over real sockets: two pinproxy replicas on one real
redis-server list the same decisions, each once, naming the replica that took it; with
the store down the answer says so (a stable code, or a list marked incomplete)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from proxy.core.models import VersionBundle
from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.sim import StartPop
from tests.integration.fleet.test_rollout import FAST, V46, V47, current, sees, until

pytestmark = pytest.mark.timeout(60)


async def get(http: aiohttp.ClientSession, proxy: RunningProxy, path: str) -> tuple[int, Any]:
    async with http.get(f"{proxy.admin_url}{path}", headers=proxy.admin_headers) as resp:
        return resp.status, await resp.json()


def decisions(body: dict[str, Any]) -> list[tuple[str, str, str, str | None]]:
    return [(e["kind"], e["region"], e["version"], e["replica"]) for e in body["events"]]


async def test_each_replica_lists_every_replicas_decisions_once(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    private_redis: RedisServer,
) -> None:
    eu = [await start_pop(f"eu-{i}", "eu", "v46") for i in range(2)]
    a, b = [await start_proxy(eu, private_redis.url, discovery=FAST,
                              rollout={"check_interval_s": 0.1, "soak_s": 30})
            for _ in range(2)]
    names = {a.services.rollout.replica, b.services.rollout.replica}
    assert len(names) == 2
    await until(lambda: all(current(p, "eu") == V46 for p in (a, b)))
    for pop in eu:  # the region flips once both runtimes report v47, by compare-and-set
        pop.flip(VersionBundle(prompt="v47"))
    await until(lambda: all(current(p, "eu") == V47 for p in (a, b)))

    # An operator's decision on replica A...
    eu[1].flip(VersionBundle(prompt="v46"))
    await until(lambda: all(sees(p, eu[1], V46) for p in (a, b)))
    async with http.put(f"{a.admin_url}/admin/rollout/regions/eu/current/v46",
                        headers=a.admin_headers) as resp:
        assert resp.status == 200, await resp.text()
        forced = await resp.json()
    assert forced["replica"] == a.services.rollout.replica
    # ...is listed by replica B, and both list the same decisions, each once.
    await until(lambda: all(current(p, "eu") == V46 for p in (a, b)))
    status, seen_by_b = await get(http, b, "/admin/events")
    assert status == 200, seen_by_b
    status, seen_by_a = await get(http, a, "/admin/events")
    assert seen_by_a == seen_by_b
    listed = decisions(seen_by_b)
    assert [(k, r, v) for k, r, v, _ in listed if k != "held_back"] == [
        ("initialised", "eu", V46), ("flipped", "eu", V47), ("forced", "eu", V46)]
    assert listed[-1][3] == a.services.rollout.replica
    assert {who for *_, who in listed} <= names
    # The winner of each compare-and-set recorded it; the other replica did not.
    flipped_by = next(who for kind, *_, who in listed if kind == "flipped")
    local = {p.services.rollout.replica: [e.kind for e in p.services.rollout.events()]
             for p in (a, b)}
    assert sum(kinds.count("flipped") for kinds in local.values()) == 1
    assert flipped_by is not None
    assert "flipped" in local[flipped_by]
    status, view = await get(http, b, "/admin/rollout")
    assert (status, view["events_complete"], view["events_error"]) == (200, True, None)
    assert decisions(view) == listed
    status, last = await get(http, b, "/admin/events?limit=1")
    assert decisions(last) == listed[-1:]

    private_redis.stop()
    status, body = await get(http, b, "/admin/events")
    assert status == 503, body
    assert body["error"]["code"] == "rollout_events_unavailable"
    assert body["error"]["type"] == "rollout_state_unavailable"
    assert "Traceback" not in body["error"]["message"]
    # The rollout picture still answers, from this replica's copy of the state, with
    # this replica's own decisions only, marked so.
    status, view = await get(http, a, "/admin/rollout")
    assert status == 200, view
    assert (view["events_complete"], view["events_error"]) == (
        False, "rollout_events_unavailable")
    assert {e["replica"] for e in view["events"]} == {a.services.rollout.replica}
    assert [r["current"] for r in view["regions"]] == [V46]


async def test_the_memory_store_lists_its_own_decisions(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("eu-1", "eu", "v46")
    proxy = await start_proxy([pop], discovery=FAST, rollout={"events_kept": 2})
    await until(lambda: current(proxy, "eu") == V46)
    for _ in range(2):  # forcing the current version records a decision, changes nothing
        async with http.put(f"{proxy.admin_url}/admin/rollout/regions/eu/current/v46",
                            headers=proxy.admin_headers) as resp:
            assert resp.status == 200, await resp.text()
    status, body = await get(http, proxy, "/admin/events")
    assert status == 200
    replica = proxy.services.rollout.replica
    assert decisions(body) == [("forced", "eu", V46, replica)] * 2  # capped at events_kept
    assert [e["detail"]["already_current"] for e in body["events"]] == [True, True]
    status, none = await get(http, proxy, "/admin/events?limit=0")
    assert none == {"events": []}
