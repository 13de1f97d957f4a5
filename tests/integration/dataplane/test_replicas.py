"""Several proxy processes sharing one Redis agree on every pin, even when they race."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
import redis.asyncio as aioredis

from proxy.sim import SimPop
from tests.fixtures.proxy import ProxyProcess
from tests.fixtures.sim import StartPop

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}


def _toml(pops: list[SimPop], redis_url: str, prefix: str) -> str:
    backends = "\n".join(
        f'[[backends]]\nid = "{p.state.backend_id}"\nregion = "{p.state.region}"\nurl = "{p.url}"\n'
        for p in pops
    )
    return f"""
[listen]
host = "127.0.0.1"
[store]
kind = "redis"
url = "{redis_url}"
key_prefix = "{prefix}"
[discovery]
interval_s = 0.2
[log]
level = "warning"
[admin]
enabled = false
{backends}
"""


async def test_two_proxy_processes_racing_first_requests_agree_on_every_pin(
    start_pop: StartPop,
    proxy_processes: Callable[..., ProxyProcess],
    redis_url: str,
    http: aiohttp.ClientSession,
) -> None:
    # Equal latencies: each replica's own choice for a new session is a coin toss.
    pops = [
        await start_pop("us-east-1", "us-east", "v47", ttfb_ms=2),
        await start_pop("eu-west-1", "eu-west", "v47", ttfb_ms=2),
        await start_pop("ap-south-1", "ap-south", "v46", ttfb_ms=2),
        await start_pop("ap-northeast-1", "ap-northeast", "v46", ttfb_ms=2),
    ]
    config = _toml(pops, redis_url, "race:")
    one = proxy_processes(config, "--workers", "2")
    two = proxy_processes(config)
    await one.wait_listening()
    await two.wait_listening()

    async def ask(proxy: ProxyProcess, session: str) -> tuple[int, str]:
        async with http.post(
            f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"X-Session-ID": session}
        ) as resp:
            body = await resp.read()
            assert resp.status == 200, body
            return resp.status, resp.headers["X-Prompt-Version"]

    # Wait until both replicas have discovered the fleet.
    for proxy in (one, two):
        for _ in range(100):
            async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.1)

    sessions = [f"race-{i}" for i in range(60)]
    answers = await asyncio.gather(
        *(ask(proxy, session) for session in sessions for proxy in (one, two, one, two))
    )
    by_session: dict[str, set[str]] = {}
    for session, (_, version) in zip((s for s in sessions for _ in range(4)), answers, strict=True):
        by_session.setdefault(session, set()).add(version)

    client = aioredis.from_url(redis_url)
    try:
        for session, versions in by_session.items():
            assert len(versions) == 1, f"{session} saw {versions}"
            stored = await client.get(f"race:pin:{session}")
            assert stored is not None
            assert orjson.loads(stored)["version_key"] == f"prompt={versions.pop()}"
    finally:
        await client.aclose()
    # The race was real: both versions won some sessions.
    pinned = [orjson.loads(p)["version_key"] for p in await _pins(redis_url, "race:pin:*")]
    assert len(pinned) == len(sessions)
    assert {"prompt=v46", "prompt=v47"} == set(pinned)
    # Every session's requests went only to POPs of its version.
    for pop in pops:
        for record in pop.requests:
            if record.session_id in by_session:
                assert record.pinned_version == pop.state.version_key


async def _pins(redis_url: str, pattern: str) -> list[bytes]:
    client = aioredis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(pattern)]
        return [v for v in await client.mget(keys) if v is not None]
    finally:
        await client.aclose()


async def test_memory_store_with_several_workers_is_refused(
    proxy_processes: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    proc = proxy_processes('[store]\nkind = "memory"\n[admin]\nenabled = false\n',
                           "--workers", "2")
    assert proc.proc is not None
    code = proc.proc.wait(20)
    assert code == 2  # serve that cannot start exits 2 (README: Commands)
    log = proc.log()
    assert "listen.workers > 1 needs store.kind = 'redis'" in log
    assert "Traceback" not in log
