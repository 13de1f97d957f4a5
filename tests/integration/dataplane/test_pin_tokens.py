"""Signed pin tokens across replicas that do not share a store (issue 10)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp
from redis.asyncio import Redis

from tests.integration.admin.sessions_helpers import eventually, wait_routable

if TYPE_CHECKING:
    from tests.fixtures.proxy import RunningProxy, StartProxy
    from tests.fixtures.sim import StartPop

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}
KEYS = {"k1": "k" * 32}


async def ask(
    http: aiohttp.ClientSession, proxy: RunningProxy, session: str, **headers: str
) -> tuple[int, Any]:
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers={"X-Session-ID": session, **headers}) as resp:
        await resp.read()
        return resp.status, resp.headers.copy()


async def regions(
    start_pop: StartPop, start_proxy: StartProxy, redis_url: str, **token: Any
) -> tuple[RunningProxy, RunningProxy]:
    """Two regions, each with its own pin store, each pinning new sessions to its version."""
    v1 = await start_pop("v1-1", "r1", "v1")
    v2 = await start_pop("v2-1", "r2", "v2")
    sessions = {"pin_token": {"keys": KEYS, "sign_with": "k1", **token}}
    proxies = []
    for prefix, admitted in (("east:", "v1"), ("west:", "v2")):
        proxies.append(await start_proxy(
            [v1, v2], redis_url, store={"key_prefix": prefix}, sessions=sessions,
            versions={"admitted_for_new_sessions": [admitted]},
        ))  # fmt: skip
    for proxy in proxies:
        await wait_routable(proxy, "v1-1", "v2-1")
    return proxies[0], proxies[1]


async def test_a_valid_token_is_honoured_by_a_region_with_its_own_store_and_written_back(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str,
) -> None:
    east, west = await regions(start_pop, start_proxy, redis_url)
    status, headers = await ask(http, east, "alice")
    assert (status, headers["X-Prompt-Version"]) == (200, "v1")
    token = headers["X-Pin-Token"]
    # West has never seen alice, and would pin her to v2: the token keeps her on v1.
    status, headers = await ask(http, west, "alice", **{"X-Pin-Token": token})
    assert (status, headers["X-Prompt-Version"]) == (200, "v1")
    assert "X-Prompt-Version-Changed" not in headers
    assert "X-Pin-Token" not in headers  # hers is still fresh
    assert west.metric("pinproxy_pin_tokens_total", result="valid") == 1
    raw = Redis.from_url(redis_url)
    try:
        async def written_back() -> bool:
            return await raw.exists(b"west:pin:alice") == 1

        await eventually(written_back, timeout=2.0, what="the pin written to west's store")
    finally:
        await raw.aclose()
    # Without the token west now answers from its own store: still v1.
    status, headers = await ask(http, west, "alice")
    assert headers["X-Prompt-Version"] == "v1"


async def test_bad_tokens_are_ignored_and_counted_never_trusted(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str,
) -> None:
    east, west = await regions(start_pop, start_proxy, redis_url)
    token = (await ask(http, east, "alice"))[1]["X-Pin-Token"]
    version, kid, payload, mac = token.split(".")
    forged_payload = (await ask(http, east, "mallory"))[1]["X-Pin-Token"].split(".")[2]
    cases = {
        "forged": f"{version}.{kid}.{forged_payload}.{mac}",
        "other_session": (await ask(http, east, "bob"))[1]["X-Pin-Token"],
        "unknown_key": f"{version}.k9.{payload}.{mac}",
        "malformed": "not a token at all",
    }
    for n, (result, bad) in enumerate(cases.items()):
        status, headers = await ask(http, west, f"alice-{n}" if result != "forged" else "alice",
                                    **{"X-Pin-Token": bad})
        # Ignored: the session is routed as west would route it anyway (v2).
        assert (status, headers["X-Prompt-Version"]) == (200, "v2"), result
        assert west.metric("pinproxy_pin_tokens_total", result=result) == 1, result


async def test_the_token_can_travel_in_a_cookie(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str,
) -> None:
    east, west = await regions(start_pop, start_proxy, redis_url, header=None, cookie="pin")
    status, headers = await ask(http, east, "carol")
    cookie = headers["Set-Cookie"]
    assert cookie.startswith("pin=v1.k1.")
    assert "HttpOnly" in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    status, headers = await ask(http, west, "carol", Cookie=f"pin={value}")
    assert (status, headers["X-Prompt-Version"]) == (200, "v1")
