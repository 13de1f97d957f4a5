"""The fleet admin API over real sockets: backends, drain, pushes, intents, the kill
switch, rollback, the versions view and the traffic distribution; auth and bad input."""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from proxy.admin import fleet
from proxy.sim import SimPop
from tests.fixtures.proxy import RunningProxy, StartProxy, loopback_resolve
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.sim import StartPop
from tests.integration.admin.fleet_helpers import Admin, Served, ask, eventually

TOKEN = "fleet-admin-token-0123456789abcdef0123"
FAST_POLL = {"interval_s": 0.1, "timeout_s": 0.5, "jitter": 0.1}


def admin_of(http: aiohttp.ClientSession, proxy: RunningProxy) -> Admin:
    return Admin(http, proxy.admin_url, proxy.admin_headers)


def backend_entry(pop: SimPop, **extra: Any) -> dict[str, Any]:
    return {"id": pop.state.backend_id, "region": pop.state.region, "url": pop.url, **extra}


async def healthy(admin: Admin, backend_id: str, key: str | None = None) -> None:
    async def check() -> bool:
        view = await admin.backend(backend_id)
        runtime = view["runtime"]
        return bool(view["healthy"]) and (key is None or (runtime and runtime["key"] == key))

    await eventually(check, within_s=5.0, what=f"{backend_id} healthy")


async def new_sessions(http: aiohttp.ClientSession, url: str, prefix: str, n: int) -> list[Served]:
    return [await ask(http, url, f"{prefix}-{i}") for i in range(n)]


# -- backends ------------------------------------------------------------------------------


async def test_backends_list_and_get_show_every_field(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    a = await start_pop("a", "us-east", "v47", parser="p2")
    b = await start_pop("b", "eu-west", "v46", ttfb_ms=600)
    proxy = await start_proxy([a, b], redis_url, admin={"token": TOKEN})
    admin = admin_of(http, proxy)
    await healthy(admin, "a")
    await healthy(admin, "b")
    # One slow request in flight to b, so "in flight" and the latency estimate show.
    proxy.registry.set_draining("a", True)
    slow = asyncio.create_task(ask(http, proxy.url, None))

    async def one_in_flight() -> bool:
        return bool((await admin.backend("b"))["in_flight"] == 1)

    await eventually(one_in_flight, within_s=3.0, what="b has a request in flight")
    assert (await slow).backend == "b"
    proxy.registry.set_draining("a", False)

    listed = await admin.ok("GET", "/admin/backends")
    assert [v["id"] for v in listed["backends"]] == ["a", "b"]
    view_a, view_b = listed["backends"]
    assert view_a == await admin.backend("a")
    assert view_a["region"] == "us-east"
    assert view_a["url"] == a.url
    assert view_a["version_source"] == "poll"
    assert view_a["added_at_runtime"] is False
    assert view_a["runtime"] == {
        "key": "prompt=v47,parser=p2",
        "prompt": "v47",
        "parser": "p2",
        "tools": None,
        "model": None,
    }
    assert view_a["report_source"] in ("poll", "stamp")
    assert isinstance(view_a["reported_at"], float)
    assert view_a["intended"] is None
    assert view_a["drift"] is False
    assert view_a["healthy"] is True
    assert view_a["draining"] is False
    assert view_a["health_history"][0]["healthy"] is True
    assert view_a["health_history"][0]["why"] == "check succeeded"
    assert view_a["in_flight"] == 0
    assert view_b["runtime"]["key"] == "prompt=v46"
    assert view_b["in_flight"] == 0
    assert view_b["latency_ewma_ms"] >= 500  # the 600 ms first byte, peak-EWMA
    assert view_a["latency_ewma_ms"] == proxy.settings.routing.initial_latency_ms

    status, error = await admin.call("GET", "/admin/backends/nope")
    assert status == 404
    assert error["error"]["type"] == "not_found_error"
    assert "nope" in error["error"]["message"]


async def test_added_backend_is_polled_and_routed_then_removed(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    a = await start_pop("a", "r1", "v1")
    extra = await start_pop("extra", "r2", "v1")
    proxy = await start_proxy([a], redis_url, discovery=FAST_POLL)
    admin = admin_of(http, proxy)
    await healthy(admin, "a")

    added = await admin.ok("POST", "/admin/backends", backend_entry(extra), status=201)
    assert added["id"] == "extra"
    assert added["added_at_runtime"] is True
    assert added["url"] == extra.url
    assert await admin.backend_ids() == ["a", "extra"]
    await healthy(admin, "extra", "prompt=v1")
    assert extra.counters.version_requests > 0

    await admin.ok("POST", "/admin/backends/a/drain")
    served = await new_sessions(http, proxy.url, "after-add", 10)
    assert {(s.status, s.backend, s.region) for s in served} == {(200, "extra", "r2")}

    # Adding it twice is a conflict, and changes nothing.
    status, error = await admin.call("POST", "/admin/backends", backend_entry(extra))
    assert status == 409
    assert error["error"]["type"] == "conflict_error"

    assert await admin.call("DELETE", "/admin/backends/extra") == (204, None)
    assert await admin.backend_ids() == ["a"]
    assert (await admin.call("GET", "/admin/backends/extra"))[0] == 404
    assert (await admin.call("DELETE", "/admin/backends/extra"))[0] == 404
    # While the remaining backend is polled five more times, the removed one is not.
    polls, a_polls = extra.counters.version_requests, a.counters.version_requests

    async def a_polled_five_times() -> bool:
        return a.counters.version_requests >= a_polls + 5

    await eventually(a_polled_five_times, within_s=5.0, what="five polls of a")
    assert extra.counters.version_requests <= polls + 1  # one poll may have been under way
    await admin.ok("DELETE", "/admin/backends/a/drain")
    assert {s.backend for s in await new_sessions(http, proxy.url, "after-rm", 5)} == {"a"}

    # A configured backend can be removed too, and added back at run time.
    assert (await admin.call("DELETE", "/admin/backends/a"))[0] == 204
    assert (await ask(http, proxy.url, "none-left")).status == 503
    await admin.ok("POST", "/admin/backends", backend_entry(a), status=201)
    await healthy(admin, "a")
    assert (await admin.backend("a"))["added_at_runtime"] is True


async def test_drained_backend_gets_no_new_sessions_but_keeps_its_pinned_ones(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    old = await start_pop("old", "r1", "v1")
    new = await start_pop("new", "r2", "v2")
    proxy = await start_proxy([old, new], redis_url)
    admin = admin_of(http, proxy)
    await healthy(admin, "old")
    await healthy(admin, "new")
    await admin.ok("POST", "/admin/versions/v2/block")
    pinned = await ask(http, proxy.url, "pinned-before-drain")
    assert (pinned.status, pinned.backend) == (200, "old")
    await admin.ok("DELETE", "/admin/versions/v2/block")

    view = await admin.ok("POST", "/admin/backends/old/drain")
    assert view["draining"] is True
    served = await new_sessions(http, proxy.url, "fresh", 15)
    assert {(s.status, s.backend) for s in served} == {(200, "new")}
    for _ in range(5):
        again = await ask(http, proxy.url, "pinned-before-drain")
        assert (again.status, again.backend, again.prompt) == (200, "old", "v1")
    assert (await ask(http, proxy.url, None)).backend == "new"  # unpinned is "new" work

    view = await admin.ok("DELETE", "/admin/backends/old/drain")
    assert view["draining"] is False
    # With two candidates P2C always takes the cheaper, so drain the other one to see
    # that "old" takes new sessions again.
    await admin.ok("POST", "/admin/backends/new/drain")
    served = await new_sessions(http, proxy.url, "undrained", 10)
    assert {(s.status, s.backend) for s in served} == {(200, "old")}


# -- version reports ---------------------------------------------------------------------


async def test_pushed_runtime_version_routes_a_backend_without_a_version_endpoint(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    dark = await start_pop("dark", "r1", "v9", version_endpoint_ok=False, stamp=False)
    proxy = await start_proxy([], redis_url, backends=[backend_entry(dark, version_source="push")])
    admin = admin_of(http, proxy)
    before = await admin.backend("dark")
    assert before["version_source"] == "push"
    assert (before["runtime"], before["healthy"]) == (None, False)
    assert (await ask(http, proxy.url, "early")).status == 503

    view = await admin.ok("PUT", "/admin/backends/dark/runtime-version", {"prompt": "v9"})
    assert view["runtime"]["key"] == "prompt=v9"
    assert view["report_source"] == "push"
    assert view["healthy"] is True
    served = await ask(http, proxy.url, "after-push")
    assert (served.status, served.backend, served.prompt) == (200, "dark", "v9")
    pin = await proxy.store.get("after-push")
    assert pin is not None
    assert pin.version_key == "prompt=v9"
    await asyncio.sleep(0.3)
    assert dark.counters.version_requests == 0  # push mode: never polled
    assert (await admin.backend("dark"))["healthy"] is True


async def test_push_to_a_polled_backend_is_a_report_and_the_next_poll_wins(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    a = await start_pop("a", "r1", "v1")
    proxy = await start_proxy([a], redis_url, discovery={"interval_s": 0.3, "jitter": 0.1})
    admin = admin_of(http, proxy)
    await healthy(admin, "a", "prompt=v1")
    view = await admin.ok("PUT", "/admin/backends/a/runtime-version", {"prompt": "v5"})
    assert (view["runtime"]["key"], view["report_source"]) == ("prompt=v5", "push")

    async def polled_again() -> bool:
        now = await admin.backend("a")
        return bool(now["runtime"]["key"] == "prompt=v1" and now["report_source"] == "poll")

    await eventually(polled_again, within_s=3.0, what="the runtime's next poll wins")


async def test_intent_is_shown_beside_the_runtime_as_drift_and_never_routes(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    a = await start_pop("a", "r1", "v1", model="m1")
    proxy = await start_proxy([a], redis_url)
    admin = admin_of(http, proxy)
    await healthy(admin, "a")
    view = await admin.ok(
        "PUT", "/admin/backends/a/intended-version", {"prompt": "v2", "model": "m1"}
    )
    assert view["intended"]["key"] == "prompt=v2,model=m1"
    assert view["runtime"]["key"] == "prompt=v1,model=m1"
    assert view["drift"] is True
    assert view["report_source"] != "push"
    served = await ask(http, proxy.url, "s")
    assert (served.status, served.prompt) == (200, "v1")  # the runtime wins
    versions = await admin.ok("GET", "/admin/versions")
    assert [v["version_key"] for v in versions["versions"]] == ["prompt=v1,model=m1"]
    assert versions["versions"][0]["intended_by"] == []

    view = await admin.ok(
        "PUT", "/admin/backends/a/intended-version", {"prompt": "v1", "model": "m1"}
    )
    assert view["drift"] is False
    assert (await admin.version("prompt=v1,model=m1") or {})["intended_by"] == ["a"]
    view = await admin.ok("DELETE", "/admin/backends/a/intended-version")
    assert (view["intended"], view["drift"]) == (None, False)


# -- versions -------------------------------------------------------------------------------


async def test_kill_switch_blocks_new_sessions_keeps_pins_and_admits_again(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    v1 = await start_pop("one", "r1", "v1", parser="p1")
    v2 = await start_pop("two", "r2", "v2", parser="p2")
    proxy = await start_proxy([v1, v2], redis_url)
    admin = admin_of(http, proxy)
    await healthy(admin, "one")
    await healthy(admin, "two")
    blocked = await admin.ok("POST", "/admin/versions/v1/block")
    assert blocked["blocked"] is True
    assert blocked["running_keys"] == ["prompt=v1,parser=p1"]
    assert (await ask(http, proxy.url, "kept")).prompt == "v2"
    await admin.ok("DELETE", "/admin/versions/v1/block")

    # Block v2 by its full key, percent-encoded, in another dimension order.
    path = "/admin/versions/" + quote("parser=p2,prompt=v2", safe="") + "/block"
    blocked = await admin.ok("POST", path)
    assert blocked["version"] == "prompt=v2,parser=p2"
    assert blocked["blocked_versions"] == ["prompt=v2,parser=p2"]
    entry = await admin.version("prompt=v2,parser=p2")
    assert entry is not None
    assert (entry["blocked"], entry["admitted"]) == (True, False)
    served = await new_sessions(http, proxy.url, "fresh", 20)
    assert {(s.status, s.prompt) for s in served} == {(200, "v1")}
    for _ in range(5):
        assert (await ask(http, proxy.url, "kept")).prompt == "v2"  # the pin is untouched

    admitted = await admin.ok("DELETE", "/admin/versions/prompt=v2,parser=p2/block")
    assert (admitted["blocked"], admitted["blocked_versions"]) == (False, [])
    entry = await admin.version("prompt=v2,parser=p2")
    assert entry is not None
    assert (entry["blocked"], entry["admitted"]) == (False, True)
    # v1 out of the way (P2C between two would always take the cheaper): v2 is back.
    await admin.ok("POST", "/admin/backends/one/drain")
    served = await new_sessions(http, proxy.url, "admitted", 10)
    assert {(s.status, s.prompt) for s in served} == {(200, "v2")}


async def test_rollback_lists_where_the_runtime_reports_it_not_the_intent(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    pops = [
        await start_pop("use1", "us-east", "v47"),
        await start_pop("euw1", "eu-west", "v47"),
        await start_pop("aps1", "ap-south", "v46"),
    ]
    proxy = await start_proxy(pops, redis_url)
    admin = admin_of(http, proxy)
    for pop in pops:
        await healthy(admin, pop.state.backend_id)
    # The controller believes ap-south took v47; its runtime says v46.
    await admin.ok("PUT", "/admin/backends/aps1/intended-version", {"prompt": "v47"})
    await admin.ok("POST", "/admin/versions/v46/block")
    assert {s.prompt for s in await new_sessions(http, proxy.url, "on47", 3)} == {"v47"}
    await admin.ok("DELETE", "/admin/versions/v46/block")
    await admin.ok("POST", "/admin/versions/v47/block")
    assert {s.prompt for s in await new_sessions(http, proxy.url, "on46", 2)} == {"v46"}

    for ref in ("v47", "prompt=v47"):
        view = await admin.ok("GET", f"/admin/versions/{ref}/rollback")
        assert view["version"] == ref
        assert view["version_keys"] == ["prompt=v47"]
        assert [b["id"] for b in view["backends"]] == ["use1", "euw1"]
        assert view["regions"] == ["eu-west", "us-east"]
        assert view["pinned_sessions"] == 3
        assert view["intended_elsewhere"] == ["aps1"]
        assert all(b["healthy"] and b["version_key"] == "prompt=v47" for b in view["backends"])
    view = await admin.ok("GET", "/admin/versions/v46/rollback")
    assert [b["id"] for b in view["backends"]] == ["aps1"]
    assert view["pinned_sessions"] == 2
    nothing = await admin.ok("GET", "/admin/versions/v99/rollback")
    assert (nothing["backends"], nothing["regions"], nothing["pinned_sessions"]) == ([], [], 0)


async def test_versions_view_skew_health_pins_and_shares(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    a = await start_pop("a", "r1", "v1")
    b = await start_pop("b", "r1", "v2")
    c = await start_pop("c", "r2", "v1")
    proxy = await start_proxy([a, b, c], redis_url, discovery=FAST_POLL)
    admin = admin_of(http, proxy)
    for pop in (a, b, c):
        await healthy(admin, pop.state.backend_id)
    await admin.ok("POST", "/admin/versions/v2/block")
    served = await new_sessions(http, proxy.url, "one", 8)
    await admin.ok("DELETE", "/admin/versions/v2/block")
    await admin.ok("POST", "/admin/versions/v1/block")
    served += await new_sessions(http, proxy.url, "two", 4)
    assert all(s.status == 200 for s in served)
    expected: dict[str, dict[str, int]] = {}
    for s in served:
        assert s.region is not None
        assert s.prompt is not None
        counts = expected.setdefault(s.region, {})
        counts[s.prompt] = counts.get(s.prompt, 0) + 1

    view = await admin.ok("GET", "/admin/versions")
    assert view["skew"] is True
    assert view["serving"] == ["prompt=v1", "prompt=v2"]
    assert view["blocked"] == ["v1"]
    one, two = view["versions"]
    assert (one["version_key"], one["prompt"]) == ("prompt=v1", "v1")
    assert (one["backends"], one["regions"], one["healthy_backends"]) == (
        ["a", "c"],
        ["r1", "r2"],
        2,
    )
    assert (one["pinned_sessions"], one["admitted"], one["blocked"]) == (8, False, True)
    assert (two["backends"], two["regions"], two["healthy_backends"]) == (["b"], ["r1"], 1)
    assert (two["pinned_sessions"], two["admitted"], two["blocked"]) == (4, True, False)
    for entry in (one, two):
        for window in ("share_5m", "share_1h"):
            shares = entry[window]
            for region, counts in expected.items():
                mine = counts.get(entry["prompt"], 0)
                if mine == 0:
                    assert region not in shares
                    continue
                assert shares[region]["requests"] == mine
                assert shares[region]["share"] == pytest.approx(mine / sum(counts.values()))

    # Health is live: c stops answering /version, v1 keeps one healthy backend; then v2
    # goes too and only one version is serving: no skew.
    c.state.version_endpoint_ok = False

    async def c_down() -> bool:
        entry = await admin.version("prompt=v1")
        return entry is not None and entry["healthy_backends"] == 1

    await eventually(c_down, within_s=5.0, what="c unhealthy")
    b.state.version_endpoint_ok = False

    async def no_skew() -> bool:
        return (await admin.ok("GET", "/admin/versions"))["skew"] is False

    await eventually(no_skew, within_s=5.0, what="skew cleared")
    assert (await admin.ok("GET", "/admin/versions"))["serving"] == ["prompt=v1"]


async def test_traffic_distribution_per_region_and_version(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    pops = [await start_pop("a", "r1", "v1"), await start_pop("b", "r2", "v2")]
    proxy = await start_proxy(pops, redis_url)
    admin = admin_of(http, proxy)
    for pop in pops:
        await healthy(admin, pop.state.backend_id)
    empty = await admin.ok("GET", "/admin/traffic?window_s=300")
    assert (empty["requests"], empty["regions"], empty["versions"]) == (0, {}, {})
    served = [await ask(http, proxy.url, None) for _ in range(12)]
    served += await new_sessions(http, proxy.url, "s", 6)
    by_region: dict[str, int] = {}
    for s in served:
        assert s.region is not None
        by_region[s.region] = by_region.get(s.region, 0) + 1

    view = await admin.ok("GET", "/admin/traffic?window_s=300")
    assert view["window_s"] == 300
    assert view["until"] - view["since"] <= 300
    assert view["requests"] == 18
    prompt = {"r1": "prompt=v1", "r2": "prompt=v2"}
    assert view["regions"] == {
        region: {"requests": n, "versions": {prompt[region]: {"requests": n, "share": 1.0}}}
        for region, n in by_region.items()
    }
    assert view["versions"] == {
        prompt[region]: {"requests": n, "share": pytest.approx(n / 18)}
        for region, n in by_region.items()
    }
    default = await admin.ok("GET", "/admin/traffic")
    assert (default["window_s"], default["requests"]) == (3600, 18)
    for bad in ("abc", "10", "86401", ""):
        status, error = await admin.call("GET", f"/admin/traffic?window_s={bad}")
        assert status == 400
        assert error["error"]["param"] == "window_s"


async def test_fleet_admin_works_with_the_memory_store(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    a = await start_pop("a", "r1", "v1")
    b = await start_pop("b", "r2", "v2")
    proxy = await start_proxy([a], discovery=FAST_POLL)
    admin = admin_of(http, proxy)
    await admin.ok("POST", "/admin/backends", backend_entry(b), status=201)
    await healthy(admin, "b")
    await admin.ok("POST", "/admin/versions/v1/block")
    served = await new_sessions(http, proxy.url, "m", 4)
    assert {s.backend for s in served} == {"b"}
    assert (await admin.version("prompt=v2") or {})["pinned_sessions"] == 4
    # Two minutes: counts are kept per wall-clock minute, and the four requests may
    # straddle a minute's end (a 60 s window is the current minute alone).
    traffic = await admin.ok("GET", "/admin/traffic?window_s=120")
    assert traffic["versions"] == {"prompt=v2": {"requests": 4, "share": 1.0}}
    rollback = await admin.ok("GET", "/admin/versions/v2/rollback")
    assert (rollback["regions"], rollback["pinned_sessions"]) == (["r2"], 4)


async def test_a_change_redis_cannot_take_is_a_503_and_changes_nothing_here(
    start_pop: StartPop,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    private_redis: RedisServer,
) -> None:
    a = await start_pop("a", "r1", "v1")
    proxy = await start_proxy([a], private_redis.url, store={"op_timeout_ms": 300})
    admin = admin_of(http, proxy)
    await healthy(admin, "a")
    private_redis.pause()
    try:
        status, error = await admin.call("POST", "/admin/backends/a/drain")
        assert status == 503
        assert error["error"]["type"] == "control_plane_unavailable"
        assert (await admin.backend("a"))["draining"] is False
        assert proxy.registry.snapshot.by_id["a"].draining is False
    finally:
        private_redis.resume()
    assert (await admin.ok("POST", "/admin/backends/a/drain"))["draining"] is True


# -- auth and bad input --------------------------------------------------------------------


def _concrete(path: str) -> str:
    return path.replace("{backend_id}", "a").replace("{version}", "v1")


async def _state(admin: Admin) -> dict[str, Any]:
    """What the bad-input tests must not change."""
    backends = (await admin.ok("GET", "/admin/backends"))["backends"]
    versions = await admin.ok("GET", "/admin/versions")
    return {
        "backends": [
            (b["id"], b["url"], b["region"], b["draining"], b["intended"],
             b["runtime"] and b["runtime"]["key"], b["report_source"] == "push")
            for b in backends
        ],
        "blocked": versions["blocked"],
    }  # fmt: skip


async def test_every_fleet_route_needs_the_token_and_changes_nothing_without(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    a = await start_pop("a", "r1", "v1")
    proxy = await start_proxy([a], redis_url, admin={"token": TOKEN})
    admin = admin_of(http, proxy)
    await healthy(admin, "a")
    before = await _state(admin)
    body = {"id": "zz", "region": "r9", "url": a.url, "prompt": "v7"}
    assert len(fleet.ROUTES) == 14
    for route in fleet.ROUTES:
        path = _concrete(route.path)
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with http.request(
                route.method, proxy.admin_url + path, json=body, headers=headers
            ) as resp:
                assert resp.status == 401, (route.method, path)
                assert (await resp.json())["error"]["type"] == "authentication_error"
    assert await _state(admin) == before
    for route in fleet.ROUTES:
        if route.method == "GET":
            assert (await admin.call("GET", _concrete(route.path)))[0] == 200, route.path


async def test_bad_input_is_a_4xx_naming_the_problem_and_changes_nothing(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    a = await start_pop("a", "r1", "v1")
    other = await start_pop("other", "r2", "v2")
    proxy = await start_proxy([a], redis_url, versions={"dimensions": ["prompt", "model"]},
                              admin_resolve=loopback_resolve)  # x.invalid: no DNS query
    admin = admin_of(http, proxy)
    await healthy(admin, "a")
    before = await _state(admin)
    good = backend_entry(other)
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/admin/backends", b'{"id": "x",', 400, "not valid JSON"),
        ("POST", "/admin/backends", b"[1, 2]", 400, "must be a JSON object"),
        ("POST", "/admin/backends", b"", 400, "must be a JSON object"),
        ("POST", "/admin/backends", {**good, "colour": "red"}, 400, "colour"),
        ("POST", "/admin/backends", {**good, "id": 5}, 400, "id"),
        ("POST", "/admin/backends", {**good, "version_source": "pull"}, 400, "version_source"),
        ("POST", "/admin/backends", {"id": "x", "region": "r"}, 400, "url"),
        ("POST", "/admin/backends", {**good, "id": "bad id!"}, 400, "id"),
        ("POST", "/admin/backends", {**good, "region": "a|b"}, 400, "region"),
        ("POST", "/admin/backends", {**good, "url": "ftp://127.0.0.1/x"}, 400, "scheme"),
        ("POST", "/admin/backends", {**good, "url": "not a url"}, 400, "url"),
        ("POST", "/admin/backends", {**good, "url": "http://u:p@127.0.0.1:1"}, 400,
         "credentials"),
        ("POST", "/admin/backends", {**good, "url": "http://admin@127.0.0.1:1"}, 400,
         "credentials"),
        ("POST", "/admin/backends", {**good, "url": "http://169.254.169.254/latest"}, 403,
         "denied network"),
        ("POST", "/admin/backends", {**good, "url": "http://[fe80::1]:8000"}, 403,
         "denied network"),
        ("POST", "/admin/backends", {**good, "url": "http://[::ffff:169.254.169.254]/"}, 403,
         "denied network"),
        ("POST", "/admin/backends", {**good, "url": "http://[fd00:ec2::254]/"}, 403,
         "denied network"),
        ("POST", "/admin/backends", {**good, "url": "http://metadata.google.internal/"}, 403,
         "denied host"),
        ("POST", "/admin/backends", {**good, "url": "http://x.invalid/"}, 403,
         "cannot be resolved"),
        ("POST", "/admin/backends", {**good, "id": "a"}, 409, "already exists"),
        ("PUT", "/admin/backends/a/runtime-version", {"prompt": 5}, 400, "prompt"),
        ("PUT", "/admin/backends/a/runtime-version", {"prompt": "v 1"}, 400, "prompt"),
        ("PUT", "/admin/backends/a/runtime-version", {}, 400, "prompt"),
        ("PUT", "/admin/backends/a/runtime-version", {"prompt": "v1", "x": 1}, 400, "x"),
        ("PUT", "/admin/backends/a/runtime-version", b"{", 400, "not valid JSON"),
        ("PUT", "/admin/backends/a/intended-version", {"prompt": ["v1"]}, 400, "prompt"),
        ("PUT", "/admin/backends/nope/runtime-version", {"prompt": "v1"}, 404, "nope"),
        ("PUT", "/admin/backends/nope/intended-version", {"prompt": "v1"}, 404, "nope"),
        ("DELETE", "/admin/backends/nope/intended-version", None, 404, "nope"),
        ("POST", "/admin/backends/nope/drain", None, 404, "nope"),
        ("DELETE", "/admin/backends/nope/drain", None, 404, "nope"),
        ("DELETE", "/admin/backends/nope", None, 404, "nope"),
        ("POST", "/admin/versions/prompt=v1,colour=x/block", None, 400, "colour"),
        ("POST", "/admin/versions/model=m1/block", None, 400, "prompt="),
        ("POST", "/admin/versions/prompt=v1,parser=p1/block", None, 400, "versions.dimensions"),
        ("POST", "/admin/versions/prompt=v1,prompt=v2/block", None, 400, "twice"),
        ("POST", "/admin/versions/v%201/block", None, 400, "prompt version"),
        ("GET", "/admin/versions/v%201/rollback", None, 400, "prompt version"),
    ]  # fmt: skip
    for method, path, body, status, needle in cases:
        if isinstance(body, bytes):
            got, error = await admin.call(method, path, raw=body)
        else:
            got, error = await admin.call(method, path, body)
        assert got == status, (method, path, body, got, error)
        message = error["error"]["message"] + " " + str(error["error"].get("param"))
        assert re.search(re.escape(needle), message), (needle, error)
        assert "Traceback" not in message
    assert await _state(admin) == before
    assert other.counters.version_requests == 0  # the refused backend was never contacted


async def test_backend_networks_allowlist_is_configurable(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    a = await start_pop("a", "r1", "v1")
    b = await start_pop("b", "r2", "v1")
    strict = await start_proxy([a], admin={"backend_networks": ["10.0.0.0/8"]})
    status, error = await admin_of(http, strict).call("POST", "/admin/backends", backend_entry(b))
    assert status == 403  # well-formed, refused by the policy
    assert "outside the allowed networks" in error["error"]["message"]
    assert await admin_of(http, strict).backend_ids() == ["a"]
    loopback = await start_proxy([a], admin={"backend_networks": ["127.0.0.0/8", "::1/128"]})
    await admin_of(http, loopback).ok("POST", "/admin/backends", backend_entry(b), status=201)
