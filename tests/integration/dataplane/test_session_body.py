"""Issue 9, section 3: a session id in the JSON body is never silently lost, over real
sockets. Each body below either reaches the session's pinned version or is refused with
a stated code before any backend sees it; none is routed unpinned by latency."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from typing import Any

import aiohttp
import pytest

from proxy.sim import SimPop
from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.sim import StartPop
from tests.integration.admin.sessions_helpers import wait_routable

JSON = {"Content-Type": "application/json"}
MIB = 1024 * 1024
PATH = "/anything/v1/chat/completions"  # the sim echoes it: any body, any size


async def _post(
    http: aiohttp.ClientSession, proxy: RunningProxy, body: bytes,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{proxy.url}{PATH}", data=body, headers=headers or JSON) as resp:
        return resp.status, await resp.json()


async def _pinned_and_shunned(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, **sections: Any
) -> tuple[RunningProxy, SimPop, SimPop]:
    """A proxy over two versions; session "s-1" pinned to one, whose POP is then made
    the slower, so a request that lost its session would go to the other one."""
    pops = [await start_pop("a", "r1", "v1"), await start_pop("b", "r2", "v2")]
    proxy = await start_proxy(pops, **sections)
    await wait_routable(proxy, "a", "b")
    status, echo = await _post(http, proxy, b'{"metadata": {"session_id": "s-1"}}')
    assert status == 200, echo
    pinned = next(p for p in pops if p.state.backend_id == echo["backend_id"])
    other = next(p for p in pops if p is not pinned)
    pinned.state.ttfb_ms = 100.0
    # The load estimate learns that the pinned POP is slow (one pinned request) ...
    assert (await _post(http, proxy, b'{"metadata": {"session_id": "s-1"}}'))[0] == 200
    # ... and the control: a request without a session now goes to the other version.
    async with http.get(f"{proxy.url}/anything/control") as resp:
        assert resp.status == 200
        assert (await resp.json())["backend_id"] == other.state.backend_id
    return proxy, pinned, other


def _served_pinned(pinned: SimPop, other: SimPop, echo: dict[str, Any], body: bytes) -> None:
    assert echo["backend_id"] == pinned.state.backend_id, echo
    record = pinned.requests[-1]
    assert record.pinned_version == pinned.state.version_key
    assert (echo["body_len"], echo["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert all(r.path != PATH for r in other.requests)


async def _refused(
    http: aiohttp.ClientSession, proxy: RunningProxy, body: bytes, status: int, code: str,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    got, document = await _post(http, proxy, body, headers)
    assert got == status, document
    error: dict[str, Any] = document["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    "body",
    [
        b'{"temperature": NaN, "metadata": {"session_id": "s-1"}}',
        b'{"logit_bias": {"1": -Infinity}, "metadata": {"session_id": "s-1"}}',
        b'\xef\xbb\xbf{"metadata": {"session_id": "s-1"}}',
        b'{"messages": [{"content": "\\ud800"}], "metadata": {"session_id": "s-1"}}',
    ],
    ids=["nan", "infinity", "bom", "lone_surrogate"],
)
async def test_a_body_orjson_refuses_but_a_backend_reads_keeps_its_session(
    body: bytes, start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy, pinned, other = await _pinned_and_shunned(start_pop, start_proxy, http)
    for _ in range(3):
        status, echo = await _post(http, proxy, body)
        assert status == 200, echo
        _served_pinned(pinned, other, echo, body)


def _big(where: str) -> bytes:
    # 20 MiB of chat content: many messages, as a long conversation sends them.
    messages = json.dumps([{"role": "user", "content": "x" * 1000}] * (20 * MIB // 1030))
    meta = '"metadata": {"session_id": "s-1"}'
    if where == "start":
        return f'{{{meta}, "messages": {messages}}}'.encode()
    if where == "end":
        return f'{{"messages": {messages}, {meta}}}'.encode()
    # NaN before the id: ijson gives up, so the whole body is held and read by json.
    return f'{{"temperature": NaN, "messages": {messages}, {meta}}}'.encode()


@pytest.mark.parametrize("where", ["start", "end", "end_after_nan"])
async def test_a_20_mib_body_keeps_its_session_wherever_the_id_is(
    where: str, start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy, pinned, other = await _pinned_and_shunned(start_pop, start_proxy, http)
    body = _big(where)
    assert len(body) > 20 * MIB - 64 * 1024
    assert len(body) > proxy.settings.upstream.max_buffered_body_bytes
    status, echo = await _post(http, proxy, body)
    assert status == 200, echo
    _served_pinned(pinned, other, echo, body)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"metadata": {"session_id": "s-1"', "the body is not JSON"),
        (b'{"metadata": {"session_id": "s-1"}} trailing', "the body is not JSON"),
        (b'{"metadata": "{\\"session_id\\": \\"s-1\\"}"}', "metadata is a string, not an object"),
        (b'{"metadata": {"session_id": 1.5}}', "not a string or an integer"),
        (b'{"metadata": {"session_id": true}}', "not a string or an integer"),
        # Past the buffer: scanned, then held to its end, which never comes as JSON.
        (b'{"messages": ["' + b"x" * (5 * MIB), "the body is not JSON"),
    ],
    ids=["truncated", "trailing", "double_encoded", "fraction", "boolean", "truncated_5mib"],
)
async def test_an_unreadable_body_source_is_refused_before_any_backend_sees_it(
    body: bytes, reason: str, start_pop: StartPop, start_proxy: StartProxy,
    http: aiohttp.ClientSession,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    error = await _refused(http, proxy, body, 400, "unreadable_session_id")
    assert reason in error["message"]
    assert error["param"] == "metadata.session_id"
    assert pop.requests == []


async def test_a_large_body_truncated_after_its_id_is_forwarded_pinned(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    # Streamed: the id is settled once read, and the rest goes through untouched; the
    # backend, not the proxy, answers the broken JSON after it.
    proxy, pinned, other = await _pinned_and_shunned(start_pop, start_proxy, http)
    body = _big("start")[: 10 * MIB]
    status, echo = await _post(http, proxy, body)
    assert status == 200, echo
    _served_pinned(pinned, other, echo, body)


async def test_a_body_with_no_id_within_the_scan_limit_is_refused_with_413(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy(
        [pop], upstream={"max_buffered_body_bytes": 16 * 1024},
        sessions={"max_scan_bytes": 256 * 1024},
    )
    padding = b'"' + b"x" * MIB + b'"'
    body = b'{"messages": ' + padding + b', "metadata": {"session_id": "s-1"}}'
    error = await _refused(http, proxy, body, 413, "session_id_beyond_scan_limit")
    assert "262144 bytes" in error["message"]
    assert pop.requests == []
    # The same body with the id in a header (an earlier source) streams straight through.
    status, echo = await _post(http, proxy, body, JSON | {"X-Session-ID": "s-1"})
    assert (status, echo["body_len"]) == (200, len(body))
    # And an id that comes first is found within the limit.
    first = b'{"metadata": {"session_id": "s-1"}, "messages": ' + padding + b"}"
    status, echo = await _post(http, proxy, first)
    assert (status, echo["body_len"]) == (200, len(first))
    assert [r.pinned_version is not None for r in pop.requests] == [True, True]


async def test_required_gives_missing_session_id_only_when_there_really_is_none(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], sessions={"required": True})
    async with http.get(f"{proxy.url}/anything/no-body") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "missing_session_id"
    for body in (b"{}", b'{"metadata": {}}', b'{"metadata": null}', b""):
        await _refused(http, proxy, body, 400, "missing_session_id")
    # A body that is not JSON by its content type is no body source's to read.
    text = b'{"metadata": {"session_id": "s-1"}}'
    await _refused(http, proxy, text, 400, "missing_session_id", {"Content-Type": "text/plain"})
    # A JSON body that cannot be read is not "missing": the id may well be in it.
    await _refused(http, proxy, b'{"metadata": {"session_id": NaN', 400,
                   "unreadable_session_id")
    await _refused(http, proxy, text, 400, "unreadable_session_id",
                   JSON | {"Content-Encoding": "gzip"})
    assert pop.requests == []
    status, _ = await _post(http, proxy, text, {"Content-Type": "application/json; charset=utf-8"})
    assert status == 200
    status, _ = await _post(http, proxy, text, {})  # no Content-Type: read as JSON too
    assert status == 200
    assert [r.pinned_version is not None for r in pop.requests] == [True, True]


async def test_a_request_without_a_json_body_is_routed_unpinned_not_refused(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop])
    async with http.get(f"{proxy.url}/anything/models") as resp:
        assert resp.status == 200
    upload = os.urandom(4096)
    async with http.post(f"{proxy.url}/anything/files", data=upload,
                         headers={"Content-Type": "application/octet-stream"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["body_len"] == len(upload)
    assert [r.pinned_version for r in pop.requests] == [None, None]


async def test_a_compressed_request_body_reaches_the_backend_byte_for_byte(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    # Found while testing Content-Encoding: the data plane inflated a gzip body and sent
    # the plain bytes on, still labelled gzip, so the backend failed (a 500).
    pop = await start_pop()
    proxy = await start_proxy([pop])
    plain = b'{"metadata": {"session_id": "s-1"}, "messages": []}' * 50
    raw = gzip.compress(plain)
    headers = JSON | {"Content-Encoding": "gzip", "X-Session-ID": "s-1"}
    status, echo = await _post(http, proxy, raw, headers)
    assert status == 200, echo
    # The sim inflates what it receives, as a backend would: it got the gzip bytes.
    assert echo["headers"]["Content-Length"] == str(len(raw))
    assert echo["headers"]["Content-Encoding"] == "gzip"
    digest = hashlib.sha256(plain).hexdigest()
    assert (echo["body_len"], echo["body_sha256"]) == (len(plain), digest)
