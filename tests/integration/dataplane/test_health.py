"""Liveness and readiness on the data port: what they check, and the drain on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.fixtures.proxy import ProxyProcess, StartProxy
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.sim import StartPop
from tests.integration.admin.sessions_helpers import backends_toml, chat, eventually, wait_routable

HEALTH = "/_pinproxy/healthz"
READY = "/_pinproxy/readyz"


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def test_healthz_and_readyz_answer_without_reaching_a_backend(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    await wait_routable(proxy, "pop-1")
    assert await _get(http, proxy.url + HEALTH) == (200, {"status": "alive"})
    status, body = await _get(http, proxy.url + READY)
    assert status == 200, body
    assert body["status"] == "ready"
    assert body["checks"]["backends"] == {"ok": True, "routable": 1, "known": 1, "configured": 1}
    assert body["checks"]["pin_store"] == {"ok": True}
    assert body["checks"]["draining"] == {"ok": True}
    async with http.head(proxy.url + READY) as resp:
        assert resp.status == 200
    async with http.post(proxy.url + HEALTH) as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["message"]
    assert [r.path for r in pop.requests] == []


async def test_readyz_is_503_until_a_backend_reports_a_version(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop(version_endpoint_ok=False)
    proxy = await start_proxy([pop])
    await eventually(lambda: pop.counters.version_requests >= 3, what="three failed polls")
    assert (await _get(http, proxy.url + HEALTH))[0] == 200
    status, body = await _get(http, proxy.url + READY)
    assert (status, body["status"]) == (503, "not_ready")
    assert body["checks"]["backends"]["ok"] is False
    assert body["checks"]["backends"]["routable"] == 0
    pop.state.version_endpoint_ok = True

    async def ready() -> bool:
        return (await _get(http, proxy.url + READY))[0] == 200

    await eventually(ready, what="ready once the backend reports")


async def test_readyz_is_503_while_the_pin_store_is_down(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    private_redis: RedisServer,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], private_redis.url, store={"op_timeout_ms": 300})
    await wait_routable(proxy, "pop-1")
    assert (await _get(http, proxy.url + READY))[0] == 200
    private_redis.stop()
    started = time.monotonic()
    status, body = await _get(http, proxy.url + READY)
    assert time.monotonic() - started < 2.0  # bounded by the store's op timeout
    assert (status, body["status"]) == (503, "not_ready")
    assert body["checks"]["pin_store"]["ok"] is False
    assert "pin store ping failed" in body["checks"]["pin_store"]["detail"]
    assert body["checks"]["backends"]["ok"] is True
    assert (await _get(http, proxy.url + HEALTH))[0] == 200  # alive all the same
    private_redis.restart()

    async def ready() -> bool:
        return (await _get(http, proxy.url + READY))[0] == 200

    await eventually(ready, what="ready once Redis is back")


async def test_health_paths_are_configurable_and_the_defaults_are_then_proxied(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], listen={"health_path": "/ops/live",
                                             "ready_path": "/ops/ready"})
    await wait_routable(proxy, "pop-1")
    assert (await _get(http, proxy.url + "/ops/live"))[0] == 200
    assert (await _get(http, proxy.url + "/ops/ready"))[0] == 200
    async with http.get(proxy.url + HEALTH) as resp:
        assert (await resp.json())["path"] == HEALTH  # the POP's echo
    assert [r.path for r in pop.requests] == [HEALTH]


async def test_sigterm_turns_readiness_503_while_still_serving_then_exits(
    start_pop: StartPop, proxy_processes: Callable[..., ProxyProcess],
    http: aiohttp.ClientSession,
) -> None:
    pop = await start_pop()
    proxy = proxy_processes(
        '[listen]\nhost = "127.0.0.1"\ndrain_grace_s = 3\n[discovery]\ninterval_s = 0.1\n'
        f'[log]\nlevel = "info"\n[admin]\nenabled = false\n{backends_toml([pop])}'
    )
    await proxy.wait_listening()

    async def ready() -> bool:
        return (await _get(http, proxy.url + READY))[0] == 200

    await eventually(ready, timeout=20, what="ready")
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    async def draining() -> bool:
        status, body = await _get(http, proxy.url + READY)
        return status == 503 and body["status"] == "draining"

    await eventually(draining, timeout=2, what="readiness 503 after SIGTERM")
    assert time.monotonic() - signalled < 1.0
    # Still alive and still serving during the grace period.
    assert (await _get(http, proxy.url + HEALTH))[0] == 200
    assert (await chat(http, proxy.url, "s"))[0] == 200
    code = await asyncio.to_thread(proxy.proc.wait, 15)
    assert code == 0
    assert time.monotonic() - signalled >= 2.5  # it waited out the grace period
    assert "Traceback" not in proxy.log()
