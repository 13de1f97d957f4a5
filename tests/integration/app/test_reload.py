"""Live reload through ``POST /admin/reload``, over real sockets (in-process proxy).

The config a reload re-reads is a mapping the test edits (``ConfigSource`` reading a
file is covered in tests/unit/config/test_reload.py, SIGHUP and ``--workers 2`` in
test_reload_process.py).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp

from proxy.config.settings import Settings, settings_from_mapping
from tests.fixtures.proxy import RunningProxy, StartProxy, proxy_config
from tests.integration.admin.sessions_helpers import CHAT, chat, wait_routable

if TYPE_CHECKING:
    from proxy.sim import SimPop
    from tests.fixtures.sim import StartPop


class EditableConfig:
    """What the proxy's reload re-reads: settings data the test changes."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __call__(self) -> Settings:
        return settings_from_mapping(self.data)


async def _reload(http: aiohttp.ClientSession, proxy: RunningProxy) -> tuple[int, Any]:
    async with http.post(f"{proxy.admin_url}/admin/reload",
                         headers=proxy.admin_headers) as resp:
        return resp.status, await resp.json()


def _backend(pop: SimPop) -> dict[str, str]:
    return {"id": pop.state.backend_id, "region": pop.state.region, "url": pop.url}


async def _proxy(
    start_proxy: StartProxy, pops: list[SimPop], **sections: Any
) -> tuple[RunningProxy, EditableConfig]:
    config = EditableConfig(proxy_config(pops, **sections))
    proxy = await start_proxy(pops, reload_from=config, **sections)
    return proxy, config


async def test_reload_adds_backends_and_new_policies_while_pins_stay(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    old = await start_pop("pop-old", "r1", "v1")
    new = await start_pop("pop-new", "r2", "v2")
    proxy, config = await _proxy(start_proxy, [old])
    await wait_routable(proxy, "pop-old")
    status, headers = await chat(http, proxy.url, "alice")
    assert (status, headers["X-Prompt-Version"]) == (200, "v1")
    before = proxy.registry.snapshot.by_id["pop-old"]

    config.data["backends"] = [_backend(old), _backend(new)]
    config.data["versions"] = {"admitted_for_new_sessions": ["v2"]}
    status, body = await _reload(http, proxy)
    assert status == 200, body
    assert body == {
        "status": "applied",
        "changed": ["backends", "versions.admitted_for_new_sessions"],
        "backends_added": ["pop-new"], "backends_removed": [], "backends_changed": [],
    }
    # The unchanged backend kept its state: still healthy, its version still known.
    kept = proxy.registry.snapshot.by_id["pop-old"]
    assert kept.routable
    assert kept.version_key == before.version_key
    await wait_routable(proxy, "pop-new")

    # The pinned session stays on its version; a new one gets the newly admitted one.
    for _ in range(5):
        status, headers = await chat(http, proxy.url, "alice")
        assert (status, headers["X-Prompt-Version"]) == (200, "v1")
        status, headers = await chat(http, proxy.url, f"bob-{_}")
        assert (status, headers["X-Prompt-Version"]) == (200, "v2")
    pin = (await proxy.store.lookup("alice", None)).pin
    assert pin is not None
    assert pin.version_key.startswith("prompt=v1")

    # Reading the same config again applies nothing.
    status, body = await _reload(http, proxy)
    assert (status, body["status"], body["changed"]) == (200, "unchanged", [])


async def test_an_invalid_config_is_refused_naming_the_field_and_the_old_one_serves(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("pop-a", "r1", "v1")
    proxy, config = await _proxy(start_proxy, [pop])
    await wait_routable(proxy, "pop-a")
    config.data["routing"] = {**config.data["routing"], "pin_wait_ms": -5}
    config.data["backends"] = []

    status, body = await _reload(http, proxy)
    assert status == 422
    error = body["error"]
    assert error["code"] == "invalid_config"
    assert error["param"] == "routing.pin_wait_ms"
    assert error["fields"] == ["routing.pin_wait_ms"]
    assert "routing.pin_wait_ms" in error["message"]
    # Nothing was applied: the backend the refused file dropped still serves.
    assert "pop-a" in proxy.registry.snapshot.by_id
    status, headers = await chat(http, proxy.url, "carol")
    assert (status, headers["X-Served-By"]) == (200, "pop-a")


async def test_settings_that_cannot_change_live_are_named_in_the_refusal(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("pop-a", "r1", "v1")
    other = await start_pop("pop-b", "r1", "v1")
    proxy, config = await _proxy(start_proxy, [pop])
    await wait_routable(proxy, "pop-a")
    config.data["listen"] = {**config.data["listen"], "port": 18080}
    config.data["store"] = {"kind": "memory", "max_sessions": 5}
    config.data["backends"] = [_backend(pop), _backend(other)]  # live, but not alone

    status, body = await _reload(http, proxy)
    assert status == 409
    error = body["error"]
    assert error["code"] == "restart_required"
    assert error["fields"] == ["listen.port", "store.max_sessions"]
    assert "listen.port, store.max_sessions" in error["message"]
    assert "pop-b" not in proxy.registry.snapshot.by_id  # nothing of it was applied


async def test_a_request_in_flight_finishes_when_a_reload_removes_its_backend(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    slow = await start_pop("pop-slow", "r1", "v1", tokens_per_second=40,
                           completion_tokens=40)  # about a second of stream
    spare = await start_pop("pop-spare", "r1", "v1")
    proxy, config = await _proxy(start_proxy, [slow])
    await wait_routable(proxy, "pop-slow")
    payload = {"model": "sim", "stream": True,
               "messages": [{"role": "user", "content": "hello"}]}
    async with http.post(f"{proxy.url}/v1/chat/completions", json=payload,
                         headers={"X-Session-ID": "dave"}) as resp:
        assert resp.headers["X-Served-By"] == "pop-slow"
        first = await resp.content.readany()
        assert first
        config.data["backends"] = [_backend(spare)]
        config.data["routing"] = {**config.data["routing"], "max_attempts": 1}
        status, body = await _reload(http, proxy)
        assert (status, body["backends_removed"], body["backends_added"]) == (
            200, ["pop-slow"], ["pop-spare"])
        assert "pop-slow" not in proxy.registry.snapshot.by_id
        rest = await resp.read()
    stream = (first + rest).decode()
    assert resp.status == 200
    assert stream.rstrip().endswith("data: [DONE]")
    assert slow.counters.streams_completed == 1
    # The session's pin is untouched; its version is served by the backend that stayed.
    await wait_routable(proxy, "pop-spare")
    status, headers = await chat(http, proxy.url, "dave")
    assert (status, headers["X-Served-By"], headers["X-Prompt-Version"]) == (
        200, "pop-spare", "v1")


async def test_concurrent_reloads_apply_once(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("pop-a", "r1", "v1")
    proxy, config = await _proxy(start_proxy, [pop])
    config.data["routing"] = {**config.data["routing"], "pin_wait_ms": 123}
    results = await asyncio.gather(*(_reload(http, proxy) for _ in range(4)))
    statuses = sorted(body["status"] for _, body in results)
    assert statuses == ["applied", "unchanged", "unchanged", "unchanged"]


async def test_the_eval_settings_reload_live(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("pop-a", "r1", "v1")
    proxy, config = await _proxy(start_proxy, [pop])
    await wait_routable(proxy, "pop-a")

    async def marked(header: str, n: int) -> None:
        for i in range(n):
            async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                                 headers={"X-Session-ID": f"{header}-{i}",
                                          header: "run-1"}) as resp:
                assert resp.status == 200

    async def traffic() -> Any:
        async with http.get(f"{proxy.admin_url}/admin/traffic",
                            headers=proxy.admin_headers) as resp:
            assert resp.status == 200
            return await resp.json()

    await marked("X-Eval-Run", 2)  # the default header: eval traffic
    before = await traffic()
    assert (before["evals"]["requests"], before["requests"]) == (2, 0)
    assert before["coverage"][0]["uncovered"] is False

    config.data["evals"] = {"header": "X-Eval-Batch", "window_s": 120,
                            "min_production_share": 0.5}
    status, body = await _reload(http, proxy)
    assert status == 200, body
    assert body["changed"] == ["evals.header", "evals.min_production_share", "evals.window_s"]
    await marked("X-Eval-Run", 3)  # no longer the eval header: production now
    await marked("X-Eval-Batch", 1)
    after = await traffic()
    assert (after["evals"]["requests"], after["requests"]) == (3, 3)
    assert (after["eval_header"], after["min_production_share"]) == ("X-Eval-Batch", 0.5)
    # The coverage is judged over the reloaded window and share: the version had
    # eval traffic in the window (both headers' requests), so it is covered.
    assert [(c["production_requests"], c["eval_requests"], c["uncovered"])
            for c in after["coverage"]] == [(3, 3, False)]
    assert proxy.services.live_settings.evals.window_s == 120
    # Unmarked by any header, eval coverage is gone for new requests, not for the past.
    config.data["evals"] = {"header": None}
    status, body = await _reload(http, proxy)
    assert status == 200, body
    await marked("X-Eval-Batch", 1)
    last = await traffic()
    assert (last["eval_header"], last["evals"]["requests"], last["requests"]) == (None, 3, 4)
