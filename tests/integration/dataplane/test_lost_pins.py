"""A conversation whose pin the store lost is never pinned silently (issue 10)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp

from tests.integration.admin.sessions_helpers import eventually, wait_routable

if TYPE_CHECKING:
    from tests.fixtures.proxy import RunningProxy, StartProxy
    from tests.fixtures.redis_server import RedisServer
    from tests.fixtures.sim import StartPop

FIRST = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}
LATER = {"model": "sim", "messages": [
    {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
    {"role": "user", "content": "and then?"},
]}  # fmt: skip


async def ask(
    http: aiohttp.ClientSession, proxy: RunningProxy, session: str, body: dict[str, Any]
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with http.post(
        f"{proxy.url}/v1/chat/completions", json=body, headers={"X-Session-ID": session}
    ) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def two_replicas(
    start_pop: StartPop, start_proxy: StartProxy, redis_url: str, **second: dict[str, Any]
) -> tuple[RunningProxy, RunningProxy]:
    slow = await start_pop("slow-1", "r1", "v1")
    fast = await start_pop("fast-1", "r2", "v2")
    # No touch batches: the holder notices the loss only when it is asked something.
    store = {"touch_interval_s": 60.0}
    # New sessions go to v2; alice is moved to v1 by an operator (pin_to_v1).
    common: dict[str, Any] = {"store": store, "audit": {"flush_interval_s": 0.05},
                              "versions": {"admitted_for_new_sessions": ["v2"]}}
    holder = await start_proxy([slow, fast], redis_url, **common)
    other = await start_proxy([slow, fast], redis_url, **common, **second)
    for proxy in (holder, other):
        await wait_routable(proxy, "slow-1", "fast-1")
    return holder, other


async def pin_to_v1(http: aiohttp.ClientSession, proxy: RunningProxy, session: str) -> None:
    """Pin ``session`` to v1 (which new sessions would not get)."""
    status, headers, _ = await ask(http, proxy, session, FIRST)
    assert status == 200
    async with http.put(
        f"{proxy.admin_url}/admin/sessions/{session}/pin", json={"version": "v1"},
        headers=proxy.admin_headers,
    ) as resp:
        assert resp.status == 200, await resp.text()
    status, headers, _ = await ask(http, proxy, session, LATER)
    assert (status, headers["X-Prompt-Version"]) == (200, "v1")


async def test_a_continuing_conversation_that_lost_its_pin_is_refused_until_it_is_written_back(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    redis_url: str, redis_server: RedisServer,
) -> None:
    holder, other = await two_replicas(start_pop, start_proxy, redis_url)
    await pin_to_v1(http, holder, "alice")
    redis_server.flushall()

    status, headers, body = await ask(http, other, "alice", LATER)
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert body["error"]["type"] == "pin_lost"
    assert body["error"]["code"] == "pin_lost"
    assert other.metric("pinproxy_lost_pins_total", action="refuse") == 1
    # A first turn is a new session, lost data or not.
    status, headers, _ = await ask(http, other, "bob", FIRST)
    assert (status, headers["X-Prompt-Version"]) == (200, "v2")
    assert "X-Prompt-Version-Changed" not in headers

    # The holder notices with its next miss and writes alice's pin back.
    assert (await ask(http, holder, "carol", FIRST))[0] == 200

    async def restored() -> bool:
        status, headers, _ = await ask(http, other, "alice", LATER)
        return status == 200 and headers["X-Prompt-Version"] == "v1"

    await eventually(restored, timeout=3.0, what="alice answered on v1 again")
    assert holder.metric("pinproxy_pin_conflicts_total",
                         from_version="prompt=v1", to_version="prompt=v2") == 0


async def test_mark_pins_a_lost_conversation_afresh_and_says_so_on_every_side(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    redis_url: str, redis_server: RedisServer,
) -> None:
    holder, other = await two_replicas(
        start_pop, start_proxy, redis_url, sessions={"on_lost_pin": "mark"}
    )
    await pin_to_v1(http, holder, "alice")
    redis_server.flushall()

    status, headers, _ = await ask(http, other, "alice", LATER)
    assert (status, headers["X-Prompt-Version"]) == (200, "v2")
    assert headers["X-Prompt-Version-Changed"] == "unknown -> prompt=v2"
    assert other.metric("pinproxy_session_version_switches_total", reason="pin_lost",
                        from_version="unknown", to_version="prompt=v2") == 1
    assert other.metric("pinproxy_lost_pins_total", action="mark") == 1

    # The holder's write-back finds the new pin: the stored pin wins, counted and marked.
    assert (await ask(http, holder, "carol", FIRST))[0] == 200

    async def conflicted() -> bool:
        return holder.metric("pinproxy_pin_conflicts_total",
                             from_version="prompt=v1", to_version="prompt=v2") == 1

    await eventually(conflicted, timeout=3.0, what="the conflict counted")
    status, headers, _ = await ask(http, holder, "alice", LATER)
    assert (status, headers["X-Prompt-Version"]) == (200, "v2")
    assert headers["X-Prompt-Version-Changed"] == "prompt=v1 -> prompt=v2"
    status, headers, _ = await ask(http, holder, "alice", LATER)
    assert "X-Prompt-Version-Changed" not in headers  # said once

    async def audited() -> bool:
        async with http.get(f"{holder.admin_url}/admin/sessions/alice",
                            headers=holder.admin_headers) as resp:
            trail = (await resp.json())["trail"]
        return any(r["error_type"] == "pin_conflict"
                   and r["version_changed"] == "prompt=v1 -> prompt=v2" for r in trail)

    await eventually(audited, timeout=3.0, what="the conflict in alice's trail")


async def test_a_store_error_is_a_json_503_with_retry_after_and_a_code(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    private_redis: RedisServer,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], private_redis.url, store={"op_timeout_ms": 200},
                              routing={"retry_after_s": 4})
    await wait_routable(proxy, "pop-1")
    private_redis.stop()
    status, headers, body = await ask(http, proxy, "never-seen", FIRST)
    assert status == 503
    assert headers["Retry-After"] == "4"
    assert headers["Content-Type"].startswith("application/json")
    assert body["error"]["type"] == "pin_store_unavailable"
    assert body["error"]["code"] == "pin_store_unavailable"
