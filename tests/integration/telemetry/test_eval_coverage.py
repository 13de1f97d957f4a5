"""Eval coverage over real sockets: requests marked with the eval header are counted
apart from production across two replicas sharing a real Redis, never reach the soak
judge, and a version users get without eval traffic shows as a coverage gap."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.sim import StartPop
from tests.integration.admin.fleet_helpers import eventually

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
V46, V47 = "prompt=v46", "prompt=v47"


async def only(http: aiohttp.ClientSession, proxy: RunningProxy, prompt: str) -> None:
    """New sessions (on ``proxy``) get ``prompt`` only: the other one is blocked."""
    other = "v46" if prompt == "v47" else "v47"
    for method, version in (("DELETE", prompt), ("POST", other)):
        async with http.request(method, f"{proxy.admin_url}/admin/versions/{version}/block",
                                headers=proxy.admin_headers) as resp:
            assert resp.status == 200, await resp.text()


async def ask(http: aiohttp.ClientSession, proxy: RunningProxy, session: str,
              evals: bool = False) -> str:
    headers = {"X-Session-ID": session, **({"X-Eval-Run": "nightly-17"} if evals else {})}
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT, headers=headers) as r:
        assert r.status == 200, await r.text()
        return r.headers["X-Prompt-Version"]


async def traffic(http: aiohttp.ClientSession, proxy: RunningProxy) -> dict[str, Any]:
    async with http.get(f"{proxy.admin_url}/admin/traffic?window_s=600",
                        headers=proxy.admin_headers) as resp:
        assert resp.status == 200
        view: dict[str, Any] = await resp.json()
        return view


async def test_eval_traffic_is_counted_apart_and_an_unexercised_version_is_a_gap(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, redis_url: str
) -> None:
    eu = await start_pop("eu-1", "eu", "v46")
    us = await start_pop("us-1", "us", "v47")
    a, b = [await start_proxy([eu, us], redis_url) for _ in range(2)]
    # Users: 20 requests on v46 in eu, 10 on v47 in us; the eval harness only tries
    # v47 (background.md: "the eval scorer only sees v47"), through the other replica.
    await only(http, a, "v46")
    for _ in range(20):
        assert await ask(http, a, "user-eu") == "v46"
    await only(http, a, "v47")
    for _ in range(10):
        assert await ask(http, a, "user-us") == "v47"
    assert await ask(http, a, "eval-1", evals=True) == "v47"
    for _ in range(4):
        assert await ask(http, b, "eval-1", evals=True) == "v47"

    async def both_counted() -> bool:
        return bool((await traffic(http, a))["evals"]["requests"] == 5)

    # b flushes its counts to Redis every second.
    await eventually(both_counted, within_s=10, what="both_counted")
    view = await traffic(http, a)
    assert view["requests"] == 30  # production only
    assert view["regions"]["eu"]["versions"][V46] == {"requests": 20, "share": 1.0}
    assert view["regions"]["us"]["versions"][V47] == {"requests": 10, "share": 1.0}
    assert view["evals"]["regions"] == {
        "us": {"requests": 5, "versions": {V47: {"requests": 5, "share": 1.0}}}}
    assert view["eval_header"] == "X-Eval-Run"
    assert {(r["region"], r["version_key"]): (r["eval_requests"], r["uncovered"])
            for r in view["coverage"]} == {("eu", V46): (0, True), ("us", V47): (5, False)}
    # The soak judge counts production only: the 5 eval answers are not v47's trials.
    assert b.services.soak.totals(V47).get("errors") is None
    assert a.services.soak.totals(V47)["errors"].trials == 10
    assert b.metric("pinproxy_eval_requests_total", prompt_version="v47", version_key=V47,
                    region="us") == 4
    async with http.get(f"{a.admin_url}/metrics", headers=a.admin_headers) as resp:
        text = await resp.text()
    assert 'pinproxy_eval_coverage_gap{prompt_version="v46",region="eu",' \
           'version_key="prompt=v46"} 1.0' in text
    assert 'pinproxy_eval_coverage_gap{prompt_version="v47",region="us",' \
           'version_key="prompt=v47"} 0.0' in text
    # Once evals exercise v46 in eu, the gap closes.
    await only(http, a, "v46")
    assert await ask(http, a, "eval-2", evals=True) == "v46"

    async def closed() -> bool:
        rows = (await traffic(http, a))["coverage"]
        return not any(r["uncovered"] for r in rows)

    await eventually(closed, within_s=10, what="closed")
