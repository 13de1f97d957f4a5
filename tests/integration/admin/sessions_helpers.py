"""Helpers shared by the session, audit, health and CLI tests."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from proxy.sim import SimPop
from tests.fixtures.proxy import RunningProxy

ROOT = Path(__file__).resolve().parents[3]
CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float = 10.0,
    what: str = "condition",
) -> float:
    """Poll ``check`` until it is true; return the seconds it took. Fails at the deadline."""
    start = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)


async def run_cli(*args: str, token: str | None = None) -> tuple[int, str, str]:
    """``pinproxy *args`` in a subprocess: (exit code, stdout, stderr); ``token`` goes
    in ``PINPROXY_ADMIN_TOKEN``."""
    # Asynchronously: the admin API answering it runs in this very event loop.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PINPROXY_")}
    if token is not None:
        env["PINPROXY_ADMIN_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def wait_routable(proxy: RunningProxy, *backend_ids: str, timeout: float = 10.0) -> None:
    def ready() -> bool:
        snap = proxy.registry.snapshot
        return all(snap.by_id[b].routable for b in backend_ids)

    await eventually(ready, timeout=timeout, what=f"{backend_ids} routable")


async def chat(
    http: aiohttp.ClientSession,
    url: str,
    session: str | None,
    *,
    request_id: str | None = None,
    traceparent: str | None = None,
) -> tuple[int, dict[str, str]]:
    headers = {}
    if session is not None:
        headers["X-Session-ID"] = session
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    if traceparent is not None:
        headers["traceparent"] = traceparent
    async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


def session_url(admin_url: str, session_id: str, suffix: str = "") -> str:
    return f"{admin_url}/admin/sessions/{quote(session_id, safe='')}{suffix}"


async def get_session(
    http: aiohttp.ClientSession, admin_url: str, session_id: str, *,
    token: str | None = None, limit: int | None = None,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    params = {"limit": str(limit)} if limit is not None else None
    async with http.get(session_url(admin_url, session_id), headers=headers,
                        params=params) as resp:
        return resp.status, await resp.json()


async def trail_of(
    http: aiohttp.ClientSession, admin_url: str, session_id: str, count: int,
    *, token: str | None = None, timeout: float = 10.0,
) -> dict[str, Any]:
    """The session document once its trail holds at least ``count`` records."""
    document: dict[str, Any] = {}

    async def filled() -> bool:
        nonlocal document
        status, document = await get_session(http, admin_url, session_id, token=token)
        return status == 200 and len(document["trail"]) >= count

    await eventually(filled, timeout=timeout, what=f"{count} trail records")
    return document


def backends_toml(pops: Sequence[SimPop]) -> str:
    return "\n".join(
        f'[[backends]]\nid = "{p.state.backend_id}"\nregion = "{p.state.region}"\nurl = "{p.url}"\n'
        for p in pops
    )
