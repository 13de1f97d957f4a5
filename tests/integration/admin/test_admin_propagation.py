"""Admin changes made on one proxy process reach another sharing the same Redis within
1 s: its admin API shows them and its routing follows them. A process started later
loads them on start."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.sim import SimPop
from tests.fixtures.proxy import ProxyProcess, free_port
from tests.fixtures.sim import StartPop
from tests.integration.admin.fleet_helpers import Admin, ask, eventually

PROPAGATION_S = 1.0  # the promise


def _config(redis_url: str, admin_port: int, pops: list[SimPop], push: SimPop) -> str:
    backends = "".join(
        f'[[backends]]\nid = "{p.state.backend_id}"\nregion = "{p.state.region}"\n'
        f'url = "{p.url}"\n\n'
        for p in pops
    )
    return f"""
[listen]
host = "127.0.0.1"
[store]
kind = "redis"
url = "{redis_url}"
[discovery]
interval_s = 0.1
timeout_s = 0.5
jitter = 0.1
[routing]
pin_wait_ms = 300
retry_after_s = 1
[admin]
host = "127.0.0.1"
port = {admin_port}
[log]
level = "warning"

{backends}[[backends]]
id = "{push.state.backend_id}"
region = "{push.state.region}"
url = "{push.url}"
version_source = "push"
"""


async def _start(
    proxy_processes: Callable[..., ProxyProcess],
    http: aiohttp.ClientSession,
    redis_url: str,
    pops: list[SimPop],
    push: SimPop,
) -> tuple[ProxyProcess, Admin]:
    admin_port = free_port()
    proc = proxy_processes(_config(redis_url, admin_port, pops, push))
    await proc.wait_listening()
    admin = Admin(http, f"http://127.0.0.1:{admin_port}", {})

    async def ready() -> bool:
        try:
            data = await admin.ok("GET", "/admin/backends")
        except aiohttp.ClientError:
            return False
        return all(b["healthy"] for b in data["backends"] if b["version_source"] == "poll")

    await eventually(ready, within_s=15.0, what="admin up and polled backends healthy", step_s=0.1)
    return proc, admin


async def _within_promise(check: Callable[[], Any], what: str) -> float:
    took = await eventually(check, within_s=PROPAGATION_S, what=what, step_s=0.01)
    assert took < PROPAGATION_S
    return took


async def test_admin_changes_on_one_process_reach_the_other_within_a_second(
    start_pop: StartPop,
    proxy_processes: Callable[..., ProxyProcess],
    http: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    a = await start_pop("a", "r1", "v1")
    b = await start_pop("b", "r2", "v2")
    late = await start_pop("late", "r3", "v1")  # added at run time
    dark = await start_pop("dark", "r4", "v3", version_endpoint_ok=False, stamp=False)
    one_proc, one = await _start(proxy_processes, http, redis_url, [a, b], dark)
    two_proc, two = await _start(proxy_processes, http, redis_url, [a, b], dark)
    took: dict[str, float] = {}

    # Add a backend on one: the other lists it, polls it, and can route to it.
    await one.ok(
        "POST", "/admin/backends", {"id": "late", "region": "r3", "url": late.url}, status=201
    )

    async def listed() -> bool:
        return "late" in await two.backend_ids()

    took["add"] = await _within_promise(listed, "added backend listed on two")

    async def late_healthy() -> bool:
        return bool((await two.backend("late"))["healthy"])

    await eventually(late_healthy, within_s=5.0, what="two polls the added backend")

    # Drain a backend on one.
    await one.ok("POST", "/admin/backends/a/drain")

    async def drained() -> bool:
        return bool((await two.backend("a"))["draining"])

    took["drain"] = await _within_promise(drained, "drain seen on two")

    # Block a version on one: two's view says so, and two's new sessions avoid it.
    await one.ok("POST", "/admin/versions/v2/block")
    counter = iter(range(10_000))

    async def two_routes_around() -> bool:
        served = [await ask(http, two_proc.url, f"blk-{next(counter)}") for _ in range(3)]
        return all(s.backend == "late" for s in served)

    took["block"] = await _within_promise(two_routes_around, "two routes around v2")
    entry = await two.version("prompt=v2")
    assert entry is not None
    assert entry["blocked"] is True
    served = [await ask(http, two_proc.url, f"after-block-{i}") for i in range(10)]
    assert {(s.status, s.backend) for s in served} == {(200, "late")}

    # Push a runtime version on one for a backend that cannot serve /version; with v1
    # blocked too, two's new sessions can only go there.
    await one.ok("POST", "/admin/versions/v1/block")
    await one.ok("PUT", "/admin/backends/dark/runtime-version", {"prompt": "v3"})

    async def two_uses_push() -> bool:
        served = await ask(http, two_proc.url, f"push-{next(counter)}")
        return (served.status, served.backend, served.prompt) == (200, "dark", "v3")

    took["push"] = await _within_promise(two_uses_push, "two routes by the pushed version")
    view = await two.backend("dark")
    assert (view["runtime"]["key"], view["report_source"]) == ("prompt=v3", "push")
    assert dark.counters.version_requests == 0

    # Remove the added backend on one.
    assert (await one.call("DELETE", "/admin/backends/late"))[0] == 204

    async def removed() -> bool:
        return "late" not in await two.backend_ids()

    took["remove"] = await _within_promise(removed, "removal seen on two")

    # A process started now loads the shared state instead of the config's defaults.
    _three_proc, three = await _start(proxy_processes, http, redis_url, [a, b], dark)
    assert await three.backend_ids() == ["a", "b", "dark"]
    assert (await three.backend("a"))["draining"] is True
    assert (await three.ok("GET", "/admin/versions"))["blocked"] == ["v1", "v2"]
    assert (await three.backend("dark"))["runtime"]["key"] == "prompt=v3"
    assert all(t < PROPAGATION_S for t in took.values()), took
    assert one_proc.proc is not None
    assert one_proc.proc.poll() is None
