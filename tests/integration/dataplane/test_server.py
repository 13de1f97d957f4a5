"""``pinproxy serve`` as a process: graceful drain, worker supervision, pin-store outages."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from proxy.sim import SimPop
from tests.fixtures.proxy import ProxyProcess, StartProxy
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.sim import StartPop

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}


def _toml(pops: list[SimPop], store: str = 'kind = "memory"', extra: str = "") -> str:
    backends = "\n".join(
        f'[[backends]]\nid = "{p.state.backend_id}"\nregion = "{p.state.region}"\nurl = "{p.url}"\n'
        for p in pops
    )
    return (f'[listen]\nhost = "127.0.0.1"\nshutdown_timeout_s = 10\n{extra}\n'
            f'[store]\n{store}\n[discovery]\ninterval_s = 0.2\n[log]\nlevel = "info"\n'
            f'[admin]\nenabled = false\n{backends}')


async def _ready(http: aiohttp.ClientSession, proxy: ProxyProcess) -> None:
    await proxy.wait_listening()
    for _ in range(100):
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as resp:
            if resp.status == 200:
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"proxy never became ready:\n{proxy.log()}")


async def test_sigterm_lets_an_inflight_stream_finish_then_exits_cleanly(
    start_pop: StartPop, proxy_processes: Callable[..., ProxyProcess],
    http: aiohttp.ClientSession,
) -> None:
    pop = await start_pop("p", "r", "v1", tokens_per_second=10, completion_tokens=12)
    proxy = proxy_processes(_toml([pop]))
    await _ready(http, proxy)
    assert proxy.proc is not None

    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT | {"stream": True},
                         headers={"X-Session-ID": "s"}) as resp:
        first = await resp.content.readline()
        assert first.startswith(b"data:")
        proxy.proc.send_signal(signal.SIGTERM)
        # Draining: the listener closes, so new connections are refused...
        await _until_refused(proxy)
        # ...while the stream already in flight runs to its end.
        rest = await resp.read()
    events = [first, *[line for line in rest.split(b"\n") if line.startswith(b"data:")]]
    assert events[-1].strip() == b"data: [DONE]"
    assert len(events) == 12 + 2
    assert await asyncio.to_thread(proxy.proc.wait, 15) == 0
    assert pop.counters.streams_completed == 1


async def _until_refused(proxy: ProxyProcess, timeout: float = 10.0) -> None:
    """Until a new connection to ``proxy`` is refused (or answered 5xx)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with aiohttp.ClientSession() as fresh, fresh.get(f"{proxy.url}/x") as r:
                refused = r.status >= 500
        except aiohttp.ClientConnectionError:
            refused = True
        if refused:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still accepting {timeout}s after SIGTERM:\n{proxy.log()}")
        await asyncio.sleep(0.05)


def _children(pid: int) -> set[int]:
    """Worker processes of the supervisor ``pid`` (not multiprocessing's helpers)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    workers = set()
    for child in map(int, out.stdout.split()):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            workers.add(child)
    return workers


async def test_a_crashed_worker_is_replaced_and_the_port_keeps_serving(
    start_pop: StartPop, proxy_processes: Callable[..., ProxyProcess],
    http: aiohttp.ClientSession, redis_url: str,
) -> None:
    pop = await start_pop("p", "r", "v1")
    proxy = proxy_processes(_toml([pop], f'kind = "redis"\nurl = "{redis_url}"'),
                            "--workers", "2")
    await _ready(http, proxy)
    assert proxy.proc is not None
    before = _children(proxy.proc.pid)
    assert len(before) == 2
    # Both workers serve before one is killed (one answering is what _ready saw).
    deadline = time.monotonic() + 20
    while proxy.log(tail=None).count("pinproxy listening on") < 2:
        assert time.monotonic() < deadline, proxy.log()
        await asyncio.sleep(0.1)
    victim = max(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = _children(proxy.proc.pid)
        if victim not in now and len(now) == len(before):
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"worker not replaced:\n{proxy.log()}")
    # A worker that has bound the port but not yet listened can be handed a connection
    # by SO_REUSEPORT and refuse it, so wait for the replacement to say it listens.
    while proxy.log(tail=None).count("pinproxy listening on") < 3:
        assert time.monotonic() < deadline, proxy.log()
        await asyncio.sleep(0.1)
    statuses = []
    for i in range(20):
        async with aiohttp.ClientSession() as fresh, fresh.post(
            f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"X-Session-ID": f"w{i}"}
        ) as resp:
            statuses.append(resp.status)
    assert statuses == [200] * 20
    assert "restarting it" in proxy.log(tail=None)


async def test_pin_store_outage_fails_closed_and_recovers(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    private_redis: RedisServer,
) -> None:
    pop = await start_pop("p", "r", "v1")
    proxy = await start_proxy([pop], private_redis.url, store={"op_timeout_ms": 200})

    async def ask(session: str | None) -> tuple[int, dict[str, object]]:
        headers = {"X-Session-ID": session} if session else {}
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                             headers=headers) as resp:
            return resp.status, await resp.json()

    assert (await ask("alice"))[0] == 200
    private_redis.stop()
    status, body = await ask("bob")
    assert status == 503
    assert body["error"]["type"] == "pin_store_unavailable"  # type: ignore[index]
    assert "Traceback" not in str(body)
    # Requests without a session never needed the store.
    assert (await ask(None))[0] == 200

    private_redis.restart()
    deadline = time.monotonic() + 10
    while (status := (await ask("bob"))[0]) != 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert status == 200
    # Redis came back empty, so alice is pinned afresh; here there is one version anyway.
    assert (await ask("alice"))[0] == 200
