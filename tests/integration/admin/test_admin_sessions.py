"""Admin API for one session: read pin and trail, repin (named or fresh), unpin.

Over real sockets: simulated POPs, the proxy's data and admin listeners, and for the
cross-replica test two ``pinproxy serve`` processes sharing one real redis-server.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.fixtures.proxy import ProxyProcess, StartProxy, free_port
from tests.fixtures.sim import StartPop
from tests.integration.admin.sessions_helpers import (
    backends_toml,
    chat,
    eventually,
    get_session,
    session_url,
    trail_of,
    wait_routable,
)

TOKEN = "admin-t0ken-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _switches(proxy: Any, old: str, new: str) -> float:
    return float(proxy.metric("pinproxy_session_version_switches_total", reason="admin_repin",
                              from_version=old, to_version=new))


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_get_repin_named_and_fresh_then_unpin(
    store: str, start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    v1 = await start_pop("us-east-1", "us-east", "v1")
    v2 = await start_pop("eu-west-1", "eu-west", "v2", parser="p9")
    # New sessions may only get v1, so "fresh" has one right answer.
    proxy = await start_proxy([v1, v2], redis_url if store == "redis" else None,
                              admin={"token": TOKEN},
                              versions={"admitted_for_new_sessions": ["v1"]},
                              audit={"flush_interval_s": 0.05})
    await wait_routable(proxy, "us-east-1", "eu-west-1")
    assert (await chat(http, proxy.url, "alice", request_id="req-1"))[0] == 200

    # GET: the pin (version, when, where) and the trail.
    before = time.time()
    document = await trail_of(http, proxy.admin_url, "alice", 1, token=TOKEN)
    assert document["session_id"] == "alice"
    pin = document["pin"]
    assert (pin["version_key"], pin["prompt_version"]) == ("prompt=v1", "v1")
    assert (pin["backend_id"], pin["region"]) == ("us-east-1", "us-east")
    assert before - 30 < pin["pinned_at"] <= time.time()
    assert [r["request_id"] for r in document["trail"]] == ["req-1"]
    assert document["records_per_session"] == 100

    # PUT a bare prompt version: resolves to the one serving key with that prompt.
    async with http.put(session_url(proxy.admin_url, "alice", "/pin"), headers=AUTH,
                        json={"version": "v2"}) as resp:
        assert resp.status == 200, await resp.text()
        result = await resp.json()
    assert result["previous"]["version_key"] == "prompt=v1"
    assert result["pin"]["version_key"] == "prompt=v2,parser=p9"
    assert (result["pin"]["backend_id"], result["pin"]["region"]) == ("eu-west-1", "eu-west")
    assert result["changed"] is True
    assert _switches(proxy, "prompt=v1", "prompt=v2,parser=p9") == 1
    status, headers = await chat(http, proxy.url, "alice", request_id="req-2")
    assert (status, headers["X-Prompt-Version"], headers["X-Served-By"]) == (200, "v2", "eu-west-1")

    # PUT fresh: the choice a new session gets now (v1 is the only admitted version).
    async with http.put(session_url(proxy.admin_url, "alice", "/pin"), headers=AUTH,
                        json={"fresh": True}) as resp:
        assert resp.status == 200, await resp.text()
        result = await resp.json()
    assert result["pin"]["version_key"] == "prompt=v1"
    assert _switches(proxy, "prompt=v2,parser=p9", "prompt=v1") == 1
    status, headers = await chat(http, proxy.url, "alice", request_id="req-3")
    assert (status, headers["X-Prompt-Version"]) == (200, "v1")

    # A full version key works too, and repinning to the current version is no switch.
    async with http.put(session_url(proxy.admin_url, "alice", "/pin"), headers=AUTH,
                        json={"version": "prompt=v1"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["changed"] is False
    assert _switches(proxy, "prompt=v1", "prompt=v1") == 0

    # The trail shows every request and every admin change, in order.
    document = await trail_of(http, proxy.admin_url, "alice", 6, token=TOKEN)
    trail = document["trail"]
    assert [(r["method"], r["version_key"], r["version_changed"]) for r in trail] == [
        ("POST", "prompt=v1", None),
        ("PUT", "prompt=v2,parser=p9", "prompt=v1 -> prompt=v2,parser=p9"),
        ("POST", "prompt=v2,parser=p9", None),
        ("PUT", "prompt=v1", "prompt=v2,parser=p9 -> prompt=v1"),
        ("POST", "prompt=v1", None),
        ("PUT", "prompt=v1", "prompt=v1 -> prompt=v1"),
    ]
    assert [r["backend_id"] for r in trail if r["method"] == "PUT"] == [None, None, None]

    # DELETE unpins: the answer names the pin removed; the trail stays readable.
    async with http.delete(session_url(proxy.admin_url, "alice", "/pin"), headers=AUTH) as resp:
        assert resp.status == 200
        assert (await resp.json())["previous"]["version_key"] == "prompt=v1"
    status, document = await get_session(http, proxy.admin_url, "alice", token=TOKEN)
    assert status == 200
    assert document["pin"] is None
    # Unpinning again, or repinning a session without a pin: 404, nothing created.
    async with http.delete(session_url(proxy.admin_url, "alice", "/pin"), headers=AUTH) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found_error"
    async with http.put(session_url(proxy.admin_url, "alice", "/pin"), headers=AUTH,
                        json={"version": "v2"}) as resp:
        assert resp.status == 404
    assert (await get_session(http, proxy.admin_url, "alice", token=TOKEN))[1]["pin"] is None
    # The next request pins the session afresh.
    assert (await chat(http, proxy.url, "alice"))[0] == 200
    assert (await get_session(http, proxy.admin_url, "alice", token=TOKEN))[1]["pin"][
        "version_key"] == "prompt=v1"


async def test_limit_and_unknown_sessions(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], audit={"records_per_session": 4})
    await wait_routable(proxy, "pop-1")
    for i in range(6):
        assert (await chat(http, proxy.url, "bob", request_id=f"b-{i}"))[0] == 200
    status, document = await get_session(http, proxy.admin_url, "bob")
    assert status == 200
    assert [r["request_id"] for r in document["trail"]] == ["b-2", "b-3", "b-4", "b-5"]
    status, document = await get_session(http, proxy.admin_url, "bob", limit=2)
    assert [r["request_id"] for r in document["trail"]] == ["b-4", "b-5"]
    status, document = await get_session(http, proxy.admin_url, "bob", limit=0)
    assert (status, document["trail"], document["pin"]["version_key"]) == (200, [], "prompt=v1")
    status, document = await get_session(http, proxy.admin_url, "nobody")
    assert status == 404
    assert document["error"]["type"] == "not_found_error"
    assert "nobody" not in document["error"]["message"]


async def test_session_ids_are_percent_decoded_and_validated_like_the_data_plane(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], sessions={"max_id_bytes": 16})
    await wait_routable(proxy, "pop-1")
    for session in ("team/alice", "a b+c%", "ünï"):
        assert (await chat(http, proxy.url, session))[0] == 200
        status, document = await get_session(http, proxy.admin_url, session)
        assert status == 200, (session, document)
        assert document["session_id"] == session
        assert document["pin"]["version_key"] == "prompt=v1"
    for raw in ("x%01y", "%7F", "%C2%85", "%ff", "a" * 17, "%C3%BC" * 9):
        url = f"{proxy.admin_url}/admin/sessions/{raw}"
        for method, suffix in (("GET", ""), ("DELETE", "/pin"), ("PUT", "/pin")):
            target = URL(url + suffix, encoded=True)
            async with http.request(method, target, json={"fresh": True}) as resp:
                assert resp.status == 400, (raw, method)
                error = (await resp.json())["error"]
                assert (error["code"], error["param"]) == ("invalid_session_id", "session_id")


async def test_bad_input_is_a_4xx_naming_the_problem_and_changes_nothing(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    v1 = await start_pop("a-1", "r-a", "v1")
    v2a = await start_pop("b-1", "r-b", "v2", parser="x")
    v2b = await start_pop("c-1", "r-c", "v2", parser="y")
    dead = await start_pop("d-1", "r-d", "v3", version_endpoint_ok=False)
    proxy = await start_proxy([v1, v2a, v2b, dead], redis_url, admin={"token": TOKEN},
                              versions={"admitted_for_new_sessions": ["v1"]})
    await wait_routable(proxy, "a-1", "b-1", "c-1")
    assert (await chat(http, proxy.url, "carol"))[0] == 200
    pin_url = session_url(proxy.admin_url, "carol", "/pin")

    async def put(body: bytes, content_type: str = "application/json") -> tuple[int, Any]:
        headers = {**AUTH, "Content-Type": content_type}
        async with http.put(pin_url, data=body, headers=headers) as resp:
            return resp.status, await resp.json()

    cases: list[tuple[bytes, int, str]] = [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "JSON object"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"version": "v1", "colour": "red"}', 400, "colour"),
        (b'{"version": 5}', 400, "version"),
        (b'{"fresh": "yes"}', 400, "fresh"),
        (b"{}", 400, "exactly one"),
        (b'{"version": "v1", "fresh": true}', 400, "exactly one"),
        (b'{"fresh": false}', 400, "true"),
        (b'{"version": ""}', 400, "version"),
        (b'{"version": "v9"}', 409, "no routable backend"),
        (b'{"version": "v3"}', 409, "no routable backend"),  # its POP never reported
        (b'{"version": "v2"}', 409, "several version keys"),
    ]
    for body, status, words in cases:
        got, answer = await put(body)
        assert got == status, (body, answer)
        assert words in answer["error"]["message"], (body, answer)
    for query in ("limit=abc", "limit=-1", "limit=10001"):
        async with http.get(f"{session_url(proxy.admin_url, 'carol')}?{query}",
                            headers=AUTH) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "limit"
    # Unsupported methods on a session path are 405 in the same JSON shape.
    async with http.post(pin_url, headers=AUTH, json={"fresh": True}) as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["message"]

    # Nothing changed: same pin, no switch counted, no admin record in the trail.
    status, document = await get_session(http, proxy.admin_url, "carol", token=TOKEN)
    assert document["pin"]["version_key"] == "prompt=v1"
    assert [r["method"] for r in document["trail"]] in ([], ["POST"])
    assert proxy.metrics.registry.get_sample_value(
        "pinproxy_session_version_switches_total",
        {"reason": "admin_repin", "from_version": "prompt=v1", "to_version": "prompt=v2,parser=x"},
    ) is None


async def test_every_session_route_needs_the_token_and_changes_nothing_without_it(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    v1 = await start_pop("a-1", "r-a", "v1")
    v2 = await start_pop("b-1", "r-b", "v2")
    proxy = await start_proxy([v1, v2], admin={"token": TOKEN},
                              versions={"admitted_for_new_sessions": ["v1"]})
    await wait_routable(proxy, "a-1", "b-1")
    assert (await chat(http, proxy.url, "dave"))[0] == 200
    routes = [
        ("GET", session_url(proxy.admin_url, "dave"), None),
        ("PUT", session_url(proxy.admin_url, "dave", "/pin"), {"version": "v2"}),
        ("DELETE", session_url(proxy.admin_url, "dave", "/pin"), None),
        ("GET", session_url(proxy.admin_url, "nobody"), None),
    ]
    for method, url, body in routes:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
            async with http.request(method, url, json=body, headers=headers) as resp:
                assert resp.status == 401, (method, url, headers)
                error = (await resp.json())["error"]
                assert error["type"] == "authentication_error"
                assert TOKEN not in await resp.text()
    status, document = await get_session(http, proxy.admin_url, "dave", token=TOKEN)
    assert (status, document["pin"]["version_key"]) == (200, "prompt=v1")


def _replica_toml(pops: list[Any], redis_url: str, admin_port: int) -> str:
    return f"""
[listen]
host = "127.0.0.1"
[store]
kind = "redis"
url = "{redis_url}"
key_prefix = "prop:"
[discovery]
interval_s = 0.1
[log]
level = "warning"
[admin]
port = {admin_port}
token = "{TOKEN}"
{backends_toml(pops)}
"""


async def test_repin_and_unpin_on_one_replica_reach_the_other_within_a_second(
    start_pop: StartPop, proxy_processes: Callable[..., ProxyProcess], redis_url: str,
    http: aiohttp.ClientSession,
) -> None:
    v1 = await start_pop("us-east-1", "us-east", "v1")
    v2 = await start_pop("eu-west-1", "eu-west", "v2")
    ports = free_port(), free_port()
    admitted = '[versions]\nadmitted_for_new_sessions = ["v1"]\n'
    one = proxy_processes(_replica_toml([v1, v2], redis_url, ports[0]) + admitted)
    two = proxy_processes(_replica_toml([v1, v2], redis_url, ports[1]) + admitted)
    admin_one, admin_two = (f"http://127.0.0.1:{port}" for port in ports)
    for proxy in (one, two):
        await proxy.wait_listening()

        async def both_known(proxy: ProxyProcess = proxy) -> bool:
            async with http.get(f"{proxy.url}/_pinproxy/readyz") as resp:
                body = await resp.json()
                return resp.status == 200 and body["checks"]["backends"]["routable"] == 2

        await eventually(both_known, timeout=20, what="replica ready with both backends")

    # Pinned through replica one; replica two serves (and caches) the same pin.
    assert (await chat(http, one.url, "erin"))[1]["X-Prompt-Version"] == "v1"
    for _ in range(3):
        status, headers = await chat(http, two.url, "erin")
        assert (status, headers["X-Prompt-Version"]) == (200, "v1")

    async with http.put(session_url(admin_one, "erin", "/pin"), headers=AUTH,
                        json={"version": "v2"}) as resp:
        assert resp.status == 200, await resp.text()
    repinned = time.monotonic()
    seen: list[str] = []

    async def two_serves_v2() -> bool:
        status, headers = await chat(http, two.url, "erin")
        assert status == 200
        seen.append(headers["X-Prompt-Version"])
        return headers["X-Prompt-Version"] == "v2"

    await eventually(two_serves_v2, timeout=5, what="replica two serving the new pin")
    assert time.monotonic() - repinned < 1.0, seen
    # And it stays there: no replica flips back.
    for proxy in (one, two, two, one):
        assert (await chat(http, proxy.url, "erin"))[1]["X-Prompt-Version"] == "v2"

    # Both replicas write the session's one trail (off the request path, so wait for
    # it): every request above and the admin repin between them.
    document = await trail_of(http, admin_two, "erin", 9 + len(seen), token=TOKEN)
    trail = document["trail"]
    assert len(trail) == 9 + len(seen)
    assert [r["version_changed"] for r in trail if r["method"] == "PUT"] == [
        "prompt=v1 -> prompt=v2"]
    served = [r["version_key"] for r in trail if r["method"] == "POST"]
    assert served.count("prompt=v1") == 4 + seen.count("v1")
    assert served.count("prompt=v2") == 5

    # Unpin through replica two; replica one's cached pin goes within a second.
    async with http.delete(session_url(admin_two, "erin", "/pin"), headers=AUTH) as resp:
        assert resp.status == 200
    unpinned = time.monotonic()

    async def one_sees_no_pin() -> bool:
        status, document = await get_session(http, admin_one, "erin", token=TOKEN)
        assert status == 200  # the trail is still there
        return document["pin"] is None

    await eventually(one_sees_no_pin, timeout=5, what="replica one dropping the pin")
    assert time.monotonic() - unpinned < 1.0
    # The next request is a new session again: v1 is the only admitted version.
    assert (await chat(http, one.url, "erin"))[1]["X-Prompt-Version"] == "v1"
