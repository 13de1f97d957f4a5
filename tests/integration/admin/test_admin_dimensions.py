"""Every admin endpoint that names a version refuses a dimension outside
``versions.dimensions``: 400 ``invalid_version``, naming the field, OpenAI-shaped, and
nothing changes. Over real sockets, against a proxy keyed on prompt and parser only."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.sim import StartPop
from tests.integration.admin.sessions_helpers import chat, session_url, wait_routable


async def _call(http: aiohttp.ClientSession, proxy: RunningProxy, method: str, path: str,
                body: Any = None) -> tuple[int, Any]:
    async with http.request(method, f"{proxy.admin_url}{path}", json=body,
                            headers=proxy.admin_headers) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    ("POST", "/admin/rollback", {"from": "prompt=v47,model=m1", "to": "v46"}, "from"),
    ("POST", "/admin/rollback", {"from": "v47", "to": "prompt=v46,tools=t1"}, "to"),
    ("POST", "/admin/versions/prompt=v47,model=m1/roll-back-to/v46", None, "version"),
    ("POST", "/admin/versions/v47/roll-back-to/prompt=v46,tools=t1", None, "target"),
    ("POST", "/admin/versions/prompt=v46,model=m1/block", None, "version"),
    ("GET", "/admin/versions/prompt=v46,model=m1/rollback", None, "version"),
    ("PUT", "/admin/rollout/regions/eu/current/prompt=v46,model=m1", None, "version"),
    ("POST", "/admin/versions/prompt=v46,model=m1/evals/eu", {"passed": 1, "failed": 0},
     "version"),
    ("PUT", "/admin/sessions/alice/pin", {"version": "prompt=v46,model=m1"}, "version"),
])
async def test_a_dimension_outside_the_configured_ones_is_a_400_naming_the_field(
    method: str, path: str, body: Any, field: str, start_pop: StartPop,
    start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    eu = await start_pop("eu-1", "eu", "v46", parser="p1")
    us = await start_pop("us-1", "us", "v47", parser="p1")
    proxy = await start_proxy([eu, us], versions={"dimensions": ["prompt", "parser"]})
    await wait_routable(proxy, "eu-1", "us-1")
    assert (await chat(http, proxy.url, "alice"))[0] == 200
    state = proxy.services.rollout.state
    status, answer = await _call(http, proxy, method, path, body)
    assert status == 400, answer
    error = answer["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "invalid_version", field, "invalid_request_error")
    assert error["message"].startswith(f"{field}: ")
    assert "versions.dimensions = prompt, parser" in error["message"]
    # Nothing was blocked, rolled back or moved.
    assert proxy.registry.snapshot.blocked_versions == frozenset()
    assert proxy.services.rollout.state == state


async def test_the_configured_dimensions_in_any_order_are_taken(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    eu = await start_pop("eu-1", "eu", "v46", parser="p1")
    us = await start_pop("us-1", "us", "v47", parser="p2")
    proxy = await start_proxy([eu, us], versions={"dimensions": ["prompt", "parser"]})
    await wait_routable(proxy, "eu-1", "us-1")
    assert (await chat(http, proxy.url, "alice"))[0] == 200
    async with http.put(session_url(proxy.admin_url, "alice", "/pin"),
                        json={"version": "parser=p2,prompt=v47"},
                        headers=proxy.admin_headers) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["pin"]["version_key"] == "prompt=v47,parser=p2"
    status, answer = await _call(http, proxy, "POST", "/admin/rollback",
                                 {"from": "parser=p2,prompt=v47", "to": "prompt=v46,parser=p1"})
    assert status == 200, answer
    assert (answer["version"], answer["to"]) == ("prompt=v47,parser=p2", "prompt=v46,parser=p1")
