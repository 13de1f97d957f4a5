"""Several proxy processes sharing one Redis agree on every pin, even when they race."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
import redis.asyncio as aioredis

from proxy.sim import SimPop
from tests.fixtures.proxy import ProxyProcess, free_port
from tests.fixtures.sim import StartPop
from tests.integration.telemetry.test_metrics import parse_samples

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}


def _toml(pops: list[SimPop], redis_url: str, prefix: str, admin_port: int) -> str:
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
# Generous: on a loaded test machine the redis-server itself may be starved of CPU.
# (A proxy process held past a call's deadline no longer fails the call: the answer
# that arrived meanwhile is read, proxy/redis/call.py.)
op_timeout_ms = 2000
[discovery]
interval_s = 0.2
[log]
level = "warning"
[admin]
port = {admin_port}
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
    admin_ports = (free_port(), free_port())
    one = proxy_processes(_toml(pops, redis_url, "race:", admin_ports[0]), "--workers", "2")
    two = proxy_processes(_toml(pops, redis_url, "race:", admin_ports[1]))
    await one.wait_listening()
    await two.wait_listening()

    async def ask(proxy: ProxyProcess, session: str) -> tuple[int, str]:
        async with http.post(
            f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"X-Session-ID": session}
        ) as resp:
            body = await resp.read()
            assert resp.status == 200, body
            return resp.status, resp.headers["X-Prompt-Version"]

    # Wait until both replicas (each worker of ``one``: a connection per request) have
    # discovered the whole fleet, or the race would be between fewer choices.
    for proxy in (one, two):
        await _until_fleet_known(proxy, len(pops))

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
    # The race was real: both versions won some sessions, and replicas that had chosen
    # the other version for a session lost its pin race (and followed the winner).
    pinned = [orjson.loads(p)["version_key"] for p in await _pins(redis_url, "race:pin:*")]
    assert len(pinned) == len(sessions)
    assert {"prompt=v46", "prompt=v47"} == set(pinned)
    lost = [await _races_lost(port) for port in admin_ports]
    assert sum(lost) > 0, lost
    # Every session's requests went only to POPs of its version.
    for pop in pops:
        for record in pop.requests:
            if record.session_id in by_session:
                assert record.pinned_version == pop.state.version_key


async def _until_fleet_known(proxy: ProxyProcess, backends: int, timeout: float = 20.0) -> None:
    """Until a few fresh connections in a row all find every backend routable."""
    deadline = time.monotonic() + timeout
    in_a_row = 0
    while in_a_row < 6:
        if time.monotonic() > deadline:
            raise AssertionError(f"{proxy.url} never knew all {backends} backends:\n"
                                 f"{proxy.log()}")
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as fresh, fresh.get(
            f"{proxy.url}/_pinproxy/readyz"
        ) as resp:
            checks = (await resp.json())["checks"]
            ready = resp.status == 200 and checks["backends"]["routable"] == backends
        in_a_row = in_a_row + 1 if ready else 0
        if not ready:
            await asyncio.sleep(0.1)


async def _races_lost(admin_port: int) -> float:
    async with aiohttp.ClientSession() as fresh, fresh.get(
        f"http://127.0.0.1:{admin_port}/metrics"
    ) as resp:
        assert resp.status == 200
        samples = parse_samples(await resp.text())
    return sum(samples.get("pinproxy_pin_races_lost_total", {}).values())


async def _pins(redis_url: str, pattern: str) -> list[bytes | str]:
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
