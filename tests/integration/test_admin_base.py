"""The admin listener itself: separate port, token on every route, JSON errors, OpenAPI."""

from __future__ import annotations

import aiohttp

from tests.fixtures.proxy import StartProxy
from tests.fixtures.sim import StartPop


async def test_admin_routes_are_not_on_the_data_port(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    async with http.get(f"{proxy.admin_url}/admin/openapi.json") as resp:
        assert resp.status == 200
        document = await resp.json()
    assert document["openapi"] == "3.1.0"
    assert "/admin/openapi.json" in document["paths"]
    # On the data port the same path is just proxied to the backend (its echo).
    async with http.get(f"{proxy.url}/admin/openapi.json") as resp:
        assert (await resp.json())["path"] == "/admin/openapi.json"


async def test_token_is_required_compared_exactly_and_never_echoed(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], admin={"token": "s3cret-token"})
    url = f"{proxy.admin_url}/admin/openapi.json"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                    {"Authorization": "Bearer s3cret-token-and-more"}):
        async with http.get(url, headers=headers) as resp:
            body = await resp.text()
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert "s3cret" not in body
            assert (await resp.json())["error"]["type"] == "authentication_error"
    async with http.get(url, headers={"Authorization": "Bearer s3cret-token"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["security"] == [{"bearer": []}]
    # Unknown admin paths need the token too, then answer in the same JSON shape.
    async with http.get(f"{proxy.admin_url}/admin/nope") as resp:
        assert resp.status == 401
    async with http.get(f"{proxy.admin_url}/admin/nope",
                        headers={"Authorization": "Bearer s3cret-token"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"]
