"""The admin listener itself: separate port, token on every route, JSON errors, OpenAPI."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.fixtures.proxy import StartProxy
from tests.fixtures.sim import StartPop

TOKEN = "s3cret-token-0123456789abcdef01234567"


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
    proxy = await start_proxy([pop], admin={"token": TOKEN})
    url = f"{proxy.admin_url}/admin/openapi.json"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Bearer {TOKEN}-and-more"},
                    {"Authorization": f"Bearer {TOKEN[:-1]}"}):
        async with http.get(url, headers=headers) as resp:
            body = await resp.text()
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert "s3cret" not in body
            assert (await resp.json())["error"]["type"] == "authentication_error"
    async with http.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["security"] == [{"bearer": []}]
    # Unknown admin paths need the token too, then answer in the same JSON shape.
    async with http.get(f"{proxy.admin_url}/admin/nope") as resp:
        assert resp.status == 401
    async with http.get(f"{proxy.admin_url}/admin/nope",
                        headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"]


@pytest.mark.parametrize("authorization", [
    b"Bearer", b"Bearer ", b"Bearer    ", b"bearer", b"Basic " + TOKEN.encode(),
    b"Token " + TOKEN.encode(), b"Bearer" + TOKEN.encode(), b"Bearer caf\xe9-\xff\xfe",
    b"Bearer " + TOKEN.encode()[:-1] + b"\xe9", b"\xff\xfe " + TOKEN.encode(), b"Bearer wrong",
])
async def test_every_malformed_admin_credential_is_a_json_401(
    authorization: bytes, start_pop: StartPop, start_proxy: StartProxy,
    http: aiohttp.ClientSession,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], admin={"token": TOKEN})
    reader, writer = await asyncio.open_connection(*proxy.admin_url[7:].split(":"))
    try:
        writer.write(b"GET /admin/openapi.json HTTP/1.1\r\nHost: x\r\nAuthorization: "
                     + authorization + b"\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 "), answer
    assert b"WWW-Authenticate: Bearer" in head
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "unauthorized")
    assert TOKEN not in body.decode()
    # Two Authorization headers, even with the right token among them, are refused too.
    async with http.get(f"{proxy.admin_url}/admin/openapi.json", headers=[
        ("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {TOKEN}"),
    ]) as resp:
        assert resp.status == 401
    async with http.get(f"{proxy.admin_url}/admin/openapi.json",
                        headers={"Authorization": f"bEaReR  {TOKEN} "}) as resp:
        assert resp.status == 200  # the scheme is case-insensitive (RFC 9110 §11.1)
