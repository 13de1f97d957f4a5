"""Helpers for the fleet admin tests: an admin client, data-plane requests, polling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}


@dataclass
class Admin:
    """Calls one proxy's admin API; answers (status, parsed JSON or None)."""

    http: aiohttp.ClientSession
    base_url: str
    headers: dict[str, str]

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        auth: bool = True,
    ) -> tuple[int, Any]:
        headers = dict(self.headers) if auth else {}
        data: bytes | None = raw
        if body is not None:
            data = orjson.dumps(body)
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self.http.request(
            method, self.base_url + path, data=data, headers=headers
        ) as resp:
            text = await resp.read()
            if resp.status >= 400:
                assert resp.content_type == "application/json", text
            return resp.status, orjson.loads(text) if text else None

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, data = await self.call(method, path, body)
        assert got == status, (method, path, got, data)
        return data

    async def backend(self, backend_id: str) -> dict[str, Any]:
        data: dict[str, Any] = await self.ok("GET", f"/admin/backends/{backend_id}")
        return data

    async def backend_ids(self) -> list[str]:
        data = await self.ok("GET", "/admin/backends")
        return [b["id"] for b in data["backends"]]

    async def version(self, key: str) -> dict[str, Any] | None:
        data = await self.ok("GET", "/admin/versions")
        found = [v for v in data["versions"] if v["version_key"] == key]
        return found[0] if found else None


@dataclass(frozen=True)
class Served:
    status: int
    backend: str | None
    region: str | None
    prompt: str | None
    error_type: str | None = None


async def ask(http: aiohttp.ClientSession, url: str, session: str | None) -> Served:
    """One chat request through the data plane."""
    headers = {"X-Session-ID": session} if session else {}
    async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers) as resp:
        body = await resp.json()
        error = body.get("error", {}).get("type") if resp.status >= 400 else None
        return Served(
            resp.status,
            resp.headers.get("X-Served-By"),
            resp.headers.get("X-Served-Region"),
            resp.headers.get("X-Prompt-Version"),
            error,
        )


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within_s: float, what: str, step_s: float = 0.02
) -> float:
    """Poll ``check`` until it holds; return how long that took, or fail at the deadline."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > within_s:
            raise AssertionError(f"{what}: not within {within_s}s")
        await asyncio.sleep(step_s)
