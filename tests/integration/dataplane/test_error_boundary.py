"""One error boundary per port: a bug is a JSON 500, logged once, recorded as a 500.

The bugs are injected into real objects behind real sockets (the pin store's methods,
the load tracker); metrics, request log and audit trail are read where an operator
reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from proxy.core.events import RequestEvent
from tests.fixtures.proxy import StartProxy
from tests.fixtures.sim import StartPop
from tests.integration.admin.sessions_helpers import session_url, trail_of
from tests.integration.telemetry.test_metrics import wait_for

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}
BOUNDARY_LOGGER = "proxy.dataplane.boundary"


class Recorder:
    def __init__(self) -> None:
        self.events: list[RequestEvent] = []

    def observe(self, event: RequestEvent) -> None:
        self.events.append(event)


def _bug(*args: object, **kwargs: object) -> Any:
    raise RuntimeError("secret-internal-detail")


@pytest.fixture
def bug_lines(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.ERROR, logger=BOUNDARY_LOGGER):
        yield caplog


def _boundary_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == BOUNDARY_LOGGER]


async def _internal_error(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    text = await resp.text()
    assert (resp.status, resp.content_type) == (500, "application/json"), text
    assert "secret-internal-detail" not in text
    assert "Traceback" not in text
    error: dict[str, Any] = (await resp.json())["error"]
    assert (error["type"], error["code"]) == ("internal_error", "internal_error")
    return error


async def test_a_data_plane_bug_is_answered_500_and_counted_logged_and_audited_as_500(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch, bug_lines: pytest.LogCaptureFixture,
) -> None:
    pop = await start_pop("us-east-1", "us-east", "v47")
    recorder = Recorder()
    proxy = await start_proxy([pop], observers=[recorder], audit={"flush_interval_s": 0.05})
    monkeypatch.setattr(proxy.store, "lookup", _bug)  # a bug in the pin store's code
    for request_id in ("r1", "r2", "r3"):
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                             headers={"X-Session-ID": "alice", "X-Request-ID": request_id}
                             ) as resp:
            await _internal_error(resp)
            assert resp.headers["X-Request-ID"] == request_id

    # Recorded as what was answered: 500, not the 499 of a client that went away.
    assert [(e.request_id, e.status, e.error_type) for e in recorder.events] == [
        (r, 500, "internal_error") for r in ("r1", "r2", "r3")]
    assert proxy.metric("pinproxy_requests_total", prompt_version="", version_key="",
                        region="", backend="", status_class="5xx") == 3
    assert proxy.metric("pinproxy_requests_total", prompt_version="", version_key="",
                        region="", backend="", status_class="4xx") == 0
    monkeypatch.undo()  # the admin API reads the trail through the same store
    trail = (await trail_of(http, proxy.admin_url, "alice", 3))["trail"]
    assert [(r["request_id"], r["status"], r["error_type"]) for r in trail] == [
        (r, 500, "internal_error") for r in ("r1", "r2", "r3")]

    # One log line with the traceback for the three, not one each.
    lines = _boundary_records(bug_lines)
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].exc_info is not None
    assert "RuntimeError" in bug_lines.text
    assert "answering POST /v1/chat/completions on the data port (answered 500)" in (
        lines[0].getMessage())


async def test_a_bug_after_the_answer_was_sent_is_recorded_as_the_status_sent(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch, bug_lines: pytest.LogCaptureFixture,
) -> None:
    pop = await start_pop("us-east-1", "us-east", "v47")
    recorder = Recorder()
    proxy = await start_proxy([pop], observers=[recorder])
    # Fails after the whole answer left: nothing more can be told to the client.
    monkeypatch.setattr(proxy.services.loads, "finish", _bug)
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        await resp.read()
    await wait_for(lambda: len(recorder.events) == 1)
    event = recorder.events[0]
    assert (event.status, event.error_type, event.backend_id) == (
        200, "internal_error", "us-east-1")
    assert len(_boundary_records(bug_lines)) == 1


async def test_a_data_port_front_door_bug_is_a_json_500(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch, bug_lines: pytest.LogCaptureFixture,
) -> None:
    pop = await start_pop("us-east-1", "us-east", "v47")
    proxy = await start_proxy([pop])
    monkeypatch.setattr(proxy.store, "ping", _bug)  # readiness asks the store
    async with http.get(f"{proxy.url}{proxy.settings.listen.ready_path}") as resp:
        await _internal_error(resp)
    assert len(_boundary_records(bug_lines)) == 1


async def test_an_admin_route_bug_is_a_json_500_logged_once(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch, bug_lines: pytest.LogCaptureFixture,
) -> None:
    pop = await start_pop("us-east-1", "us-east", "v47")
    proxy = await start_proxy([pop])
    monkeypatch.setattr(proxy.store, "get", _bug)
    for _ in range(3):
        async with http.get(session_url(proxy.admin_url, "alice"),
                            headers=proxy.admin_headers) as resp:
            error = await _internal_error(resp)
            assert error["message"] == "internal error in the admin API"
    lines = _boundary_records(bug_lines)
    assert len(lines) == 1
    assert "on the admin port" in lines[0].getMessage()


class Broken:
    def observe(self, event: RequestEvent) -> None:
        _bug()


async def test_a_failing_observer_changes_no_answer_and_is_logged_once_per_interval(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    bug_lines: pytest.LogCaptureFixture,
) -> None:
    pop = await start_pop("us-east-1", "us-east", "v47")
    recorder = Recorder()
    proxy = await start_proxy([pop], observers=[Broken(), recorder])
    for _ in range(3):
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
            await resp.read()
    await wait_for(lambda: len(recorder.events) == 3)
    assert [e.status for e in recorder.events] == [200, 200, 200]
    lines = _boundary_records(bug_lines)
    assert len(lines) == 1
    assert "in request observer" in lines[0].getMessage()
    assert lines[0].exc_info is not None
