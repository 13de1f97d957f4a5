"""One structured log line per proxied request, with the session id hashed."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import aiohttp
import orjson
import pytest

from proxy.core.events import RequestEvent
from proxy.telemetry.logs import JsonFormatter, TextFormatter
from proxy.telemetry.requestlog import LineSink, RequestLog, SessionHasher, route_request_log
from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.sim import StartPop
from tests.integration.telemetry.test_metrics import wait_for

if TYPE_CHECKING:
    from proxy.telemetry.requestlog import Taken

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}],
        "stream": True, "stream_options": {"include_usage": True}}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Both:
    """The process's request-log sink, written as JSON and as text at once."""

    def __init__(self, *sinks: LineSink) -> None:
        self._sinks = sinks

    def write(self, lines: Sequence[Taken], hasher: SessionHasher) -> None:
        for sink in self._sinks:
            sink.write(lines, hasher)


@pytest.fixture
def log_lines() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """What the request log writes, as JSON and as text."""
    as_json, as_text = io.StringIO(), io.StringIO()
    route_request_log(Both(LineSink(as_json, JsonFormatter(worker=3)),
                           LineSink(as_text, TextFormatter(worker=3))))
    yield as_json, as_text
    route_request_log(None)


def _request_log(proxy: RunningProxy) -> RequestLog:
    request_log = proxy.services.telemetry.request_log
    assert request_log is not None
    return request_log


async def test_one_json_line_per_request_with_a_hashed_session(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    log_lines: tuple[io.StringIO, io.StringIO],
) -> None:
    pop = await start_pop("us-east-1", "us-east", "v47", completion_tokens=4)
    proxy = await start_proxy([pop], log={"session_hash_key": "k3y"})
    headers = {"X-Session-ID": "alice", "X-Request-ID": "req-1", "traceparent": TRACEPARENT}
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers=headers) as resp:
        assert resp.status == 200
        await resp.read()
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers={"X-Session-ID": "alice"}) as resp:
        await resp.read()
    as_json, as_text = log_lines
    await wait_for(lambda: as_json.getvalue().count("\n") == 2)  # the writer thread's work

    first, second = (orjson.loads(line) for line in as_json.getvalue().splitlines())
    alice = SessionHasher(b"k3y")("alice")
    assert alice is not None
    assert len(alice) == 16
    assert "alice" not in as_json.getvalue()
    duration, ttfb = first.pop("duration_ms"), first.pop("ttfb_ms")
    assert 0 < ttfb <= duration < 10_000
    assert first.pop("time").endswith("+00:00")
    assert first.pop("prompt_tokens") > 0
    assert first == {
        "level": "info",
        "logger": "pinproxy.requests",
        "message": "request",
        "worker": 3,
        "request_id": "req-1",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "session": alice,
        "client": "127.0.0.1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "prompt_version": "v47",
        "version_key": "prompt=v47",
        "region": "us-east",
        "backend": "us-east-1",
        "new_pin": True,
        "version_changed": None,
        "completion_tokens": 4,
        "structured_output_valid": None,
        "streamed": True,
        "error_type": None,
    }
    assert (second["session"], second["new_pin"]) == (alice, False)
    assert len(second["request_id"]) == 32  # one was made up for it

    text = as_text.getvalue().splitlines()[0]
    assert "[w3] pinproxy.requests: request request_id=req-1" in text
    assert (f"session={alice} client=127.0.0.1 method=POST path=/v1/chat/completions"
            " status=200") in text
    assert "prompt_version=v47 version_key=prompt=v47 region=us-east backend=us-east-1" in text
    assert "new_pin=yes" in text
    assert "alice" not in text


async def test_raw_session_ids_when_configured_and_no_line_when_off(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    log_lines: tuple[io.StringIO, io.StringIO],
) -> None:
    pop = await start_pop()
    raw = await start_proxy([pop], log={"raw_session_ids": True})
    quiet = await start_proxy([pop], log={"request_log": False})
    assert quiet.services.telemetry.request_log is None
    for proxy in (raw, quiet):
        async with http.get(f"{proxy.url}/x", headers={"X-Session-ID": "bob"}) as resp:
            assert resp.status == 200
    _request_log(raw).flush()
    lines = [orjson.loads(line) for line in log_lines[0].getvalue().splitlines()]
    assert [(line["session"], line["path"]) for line in lines] == [("bob", "/x")]


def test_a_full_queue_drops_and_counts_instead_of_waiting() -> None:
    dropped: list[int] = []
    request_log = RequestLog(SessionHasher(None), max_pending=2, on_drop=dropped.append)
    event = RequestEvent(
        at=0.0, request_id="r", trace_id="t", session_id=None, method="GET", path="/",
        status=200, backend_id=None, region=None, version_key=None, new_pin=False,
        version_changed=None, duration_s=0.0, ttfb_s=None, error_type=None,
    )
    for _ in range(5):
        request_log.observe(event)
    assert (request_log.dropped, dropped) == (3, [1, 1, 1])
    assert "dropped=3" in repr(request_log)


def test_hashes_are_keyed_and_stable() -> None:
    a, b = SessionHasher(b"one"), SessionHasher(b"two")
    assert a("s") == SessionHasher(b"one")("s") != b("s")
    assert a(None) is None
    assert SessionHasher(None)("s") != SessionHasher(None)("s")  # random key per process
    assert "one" not in repr(a)


async def test_the_request_log_names_the_resolved_client(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    log_lines: tuple[io.StringIO, io.StringIO],
) -> None:
    pop = await start_pop()
    forged = {"X-Forwarded-For": "6.6.6.6, 198.51.100.1"}
    untrusting = await start_proxy([pop])
    trusting = await start_proxy([pop], listen={"trusted_proxies": ["127.0.0.1/32"]})
    for proxy in (untrusting, trusting):
        async with http.get(f"{proxy.url}/x", headers=forged) as resp:
            assert resp.status == 200
        _request_log(proxy).flush()
    lines = [orjson.loads(line) for line in log_lines[0].getvalue().splitlines()]
    # The socket's peer when nobody is trusted; the rightmost untrusted hop otherwise.
    assert [line["client"] for line in lines] == ["127.0.0.1", "198.51.100.1"]
