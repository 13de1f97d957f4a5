"""The simulated POP over real sockets, driven with an aiohttp client."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import struct
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from proxy.core.models import VersionBundle
from proxy.sim import PopState, SimPop

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.fixtures.sim import StartPop

CHAT = "/v1/chat/completions"
STAMP_NAMES = ("X-Prompt-Version", "X-Parser-Version", "X-Tools-Version", "X-Model-Version")


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-x", "messages": [{"role": "user", "content": "hello there"}], **extra}


async def read_sse(resp: aiohttp.ClientResponse) -> list[tuple[float, str]]:
    """Every ``data:`` payload with the loop time it was read at."""
    loop = asyncio.get_running_loop()
    events = []
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data: "):
            events.append((loop.time(), line[len("data: ") :]))
    return events


async def test_version_reports_bundle_and_stamps(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("us-east-1", "us-east", "v47", parser="p2", tools="t1", model="m1")
    async with http.get(f"{pop.url}/version") as resp:
        assert resp.status == 200
        assert orjson.loads(await resp.read()) == {
            "prompt": "v47",
            "parser": "p2",
            "tools": "t1",
            "model": "m1",
            "backend_id": "us-east-1",
            "region": "us-east",
        }
        stamps = [resp.headers.get(name) for name in STAMP_NAMES]
        assert stamps == ["v47", "p2", "t1", "m1"]
        assert resp.headers["X-Backend-ID"] == "us-east-1"
    assert pop.counters.version_requests == 1
    assert pop.requests == []  # /version is not an API request


async def test_partial_bundle_reports_and_stamps_only_what_is_set(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop(prompt="v3", model="m9")
    async with http.get(f"{pop.url}/version") as resp:
        assert orjson.loads(await resp.read()) == {
            "prompt": "v3",
            "model": "m9",
            "backend_id": "pop-1",
            "region": "r1",
        }
        assert "X-Parser-Version" not in resp.headers
        assert "X-Tools-Version" not in resp.headers
        assert resp.headers["X-Model-Version"] == "m9"


async def test_stamp_off_sends_no_version_headers(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop(stamp=False, parser="p1")
    for method, path in (("GET", "/version"), ("POST", CHAT)):
        async with http.request(method, f"{pop.url}{path}", json=chat_body()) as resp:
            assert resp.status == 200
            assert not {*STAMP_NAMES, "X-Backend-ID"} & set(resp.headers)


async def test_chat_completion_non_stream(start_pop: StartPop, http: aiohttp.ClientSession) -> None:
    pop = await start_pop("eu-1", "eu", "v7", completion_tokens=5, model="m2")
    headers = {"X-Session-ID": "s-1", "X-Pinned-Version": "prompt=v7"}
    sent = orjson.dumps(chat_body())
    async with http.post(f"{pop.url}{CHAT}", data=sent, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["X-Prompt-Version"] == "v7"
        body = orjson.loads(await resp.read())
    assert body["object"] == "chat.completion"
    assert body["model"] == "m2"
    content = body["choices"][0]["message"]["content"]
    assert content == "[eu-1 v7] token token token token token"
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    [record] = pop.requests
    assert (record.method, record.path, record.session_id) == ("POST", CHAT, "s-1")
    assert record.pinned_version == "prompt=v7"
    assert record.body_len == len(sent)
    assert record.version_key == "prompt=v7,model=m2"
    assert record.headers["X-Session-ID"] == "s-1"
    assert pop.counters.responses == {200: 1}


async def test_model_defaults_to_sim_model(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    async with http.post(f"{pop.url}{CHAT}", json=chat_body()) as resp:
        assert orjson.loads(await resp.read())["model"] == "sim-model"


async def test_ttfb_delays_the_response_head(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop(ttfb_ms=150)
    loop = asyncio.get_running_loop()
    sent = loop.time()
    async with http.post(f"{pop.url}{CHAT}", json=chat_body()) as resp:
        assert resp.status == 200
    assert loop.time() - sent >= 0.14


async def test_stream_chunks_arrive_incrementally(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop(tokens_per_second=20, completion_tokens=5)
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    sent_when_first_read = None
    async with http.post(f"{pop.url}{CHAT}", json=chat_body(stream=True)) as resp:
        head_at = loop.time()
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["X-Prompt-Version"] == "v1"
        # The head is in hand while the stream is still being generated.
        assert pop.counters.streams_completed == 0
        async for raw in resp.content:
            if raw.startswith(b"data: {") and b'"content"' in raw:
                arrivals.append(loop.time())
                if sent_when_first_read is None:
                    sent_when_first_read = pop.counters.chunks_sent
    assert len(arrivals) == 5
    # Proof by the server's own count: when the first token reached us, the POP had
    # not yet produced the last one (pacing puts >= 25 ms between tokens, so no
    # scheduler stall can let it write all five first).
    assert sent_when_first_read is not None
    assert sent_when_first_read < 5
    assert pop.counters.chunks_sent == 5
    # Nominally 200 ms from first to last token; a stall can shave at most a few
    # intervals, never all of them.
    assert arrivals[-1] - arrivals[0] >= 0.06
    assert arrivals[0] >= head_at


async def test_stream_usage_chunk_and_done(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("ap-1", "ap", "v46", completion_tokens=3)
    body = chat_body(stream=True, stream_options={"include_usage": True})
    async with http.post(f"{pop.url}{CHAT}", json=body) as resp:
        events = [data for _, data in await read_sse(resp)]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 3
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 3
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == "[ap-1 v46] token token token"
    assert pop.counters.streams_completed == 1


async def test_stream_without_include_usage_has_no_usage(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop(completion_tokens=2)
    async with http.post(f"{pop.url}{CHAT}", json=chat_body(stream=True)) as resp:
        events = [data for _, data in await read_sse(resp)]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) == 3  # two tokens and the finish chunk
    assert all("usage" not in c and c["choices"] for c in chunks)


async def test_client_disconnect_mid_stream_is_quiet(
    start_pop: StartPop, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    pop = await start_pop(tokens_per_second=100, completion_tokens=1000)
    with caplog.at_level(logging.DEBUG):
        resp = await http.post(f"{pop.url}{CHAT}", json=chat_body(stream=True))
        await resp.content.readline()
        resp.close()  # drops the connection
        async with asyncio.timeout(5):
            await pop.wait_idle()
    assert pop.counters.streams_aborted == 1
    assert pop.counters.in_flight == 0
    assert pop.counters.streams_completed == 0
    assert pop.counters.chunks_sent < 1000
    assert [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []


async def test_strict_mode_rejects_other_pins(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop(prompt="v47", parser="p2", strict=True)
    url = f"{pop.url}{CHAT}"
    async with http.post(url, json=chat_body(), headers={"X-Pinned-Version": "prompt=v46"}) as resp:
        assert resp.status == 409
        assert resp.headers["X-Prompt-Version"] == "v47"
        error = orjson.loads(await resp.read())["error"]
        assert error["type"] == "version_mismatch"
        assert "prompt=v47,parser=p2" in error["message"]
        assert (error["param"], error["code"]) == (None, None)
    pinned = {"X-Pinned-Version": "prompt=v47,parser=p2"}
    async with http.post(url, json=chat_body(), headers=pinned) as resp:
        assert resp.status == 200
    async with http.post(url, json=chat_body()) as resp:
        assert resp.status == 200  # unpinned requests are always served
    pop.state.key_dimensions = ("prompt",)
    assert pop.state.strict_key == "prompt=v47"
    async with http.post(url, json=chat_body(), headers={"X-Pinned-Version": "prompt=v47"}) as resp:
        assert resp.status == 200
    assert pop.counters.responses == {409: 1, 200: 3}


async def test_fail_status_fails_api_but_not_version(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop(fail_status=503)
    async with http.post(f"{pop.url}{CHAT}", json=chat_body()) as resp:
        assert resp.status == 503
        assert resp.headers["X-Backend-ID"] == "pop-1"
        assert orjson.loads(await resp.read())["error"]["type"] == "server_error"
    async with http.get(f"{pop.url}/anything") as resp:
        assert resp.status == 503
    async with http.get(f"{pop.url}/version") as resp:
        assert resp.status == 200
    async with http.get(f"{pop.url}/_sim/state") as resp:
        assert resp.status == 200
    pop.state.fail_status = 429
    async with http.post(f"{pop.url}{CHAT}", json=chat_body()) as resp:
        assert resp.status == 429
        assert orjson.loads(await resp.read())["error"]["type"] == "rate_limit_error"
    assert len(pop.requests) == 3


async def test_version_endpoint_can_fail(start_pop: StartPop, http: aiohttp.ClientSession) -> None:
    pop = await start_pop(version_endpoint_ok=False)
    async with http.get(f"{pop.url}/version") as resp:
        assert resp.status == 503
        assert resp.headers["X-Prompt-Version"] == "v1"
    async with http.post(f"{pop.url}{CHAT}", json=chat_body()) as resp:
        assert resp.status == 200


async def test_flip_from_python(start_pop: StartPop, http: aiohttp.ClientSession) -> None:
    pop = await start_pop(prompt="v46", completion_tokens=1)
    pop.flip(VersionBundle("v47", parser="p3"))
    async with http.get(f"{pop.url}/version") as resp:
        assert orjson.loads(await resp.read())["prompt"] == "v47"
    async with http.post(f"{pop.url}{CHAT}", json=chat_body()) as resp:
        assert resp.headers["X-Prompt-Version"] == "v47"
        assert resp.headers["X-Parser-Version"] == "p3"
        content = orjson.loads(await resp.read())["choices"][0]["message"]["content"]
        assert content == "[pop-1 v47] token"
    assert "prompt=v47,parser=p3" in repr(pop)


async def test_control_endpoint_applies_partial_updates(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop(prompt="v46", parser="p1")
    update = {"version": {"prompt": "v47"}, "ttfb_ms": 5, "strict": True}
    async with http.post(f"{pop.url}/_sim/control", json=update) as resp:
        assert resp.status == 200
        state = orjson.loads(await resp.read())
    assert state["version"] == {"prompt": "v47", "parser": "p1"}
    assert (state["ttfb_ms"], state["strict"], state["version_key"]) == (
        5.0,
        True,
        "prompt=v47,parser=p1",
    )
    assert pop.state.strict is True
    async with http.get(f"{pop.url}/version") as resp:
        assert resp.headers["X-Prompt-Version"] == "v47"
        assert orjson.loads(await resp.read())["prompt"] == "v47"
    async with http.post(f"{pop.url}/_sim/control", json={"version": {"parser": None}}) as resp:
        assert orjson.loads(await resp.read())["version"] == {"prompt": "v47"}
    async with http.get(f"{pop.url}/version") as resp:
        assert "X-Parser-Version" not in resp.headers


@pytest.mark.parametrize(
    "body",
    [
        b'{"ttfb_ms": 5, "bogus": 1}',
        b'{"ttfb_ms": "fast"}',
        b'{"ttfb_ms": -1}',
        b'{"strict": 1}',
        b'{"completion_tokens": 2.5}',
        b'{"fail_status": 200}',
        b'{"key_dimensions": ["prompt", "colour"]}',
        b'{"version": {"prompt": "bad value"}}',
        b'{"version": {"prompt": null}}',
        b'{"version": "v47"}',
        b"[1, 2]",
        b"{not json",
    ],
)
async def test_control_rejects_bad_input_and_changes_nothing(
    start_pop: StartPop, http: aiohttp.ClientSession, body: bytes
) -> None:
    pop = await start_pop()
    before = pop.state.as_dict()
    async with http.post(f"{pop.url}/_sim/control", data=body) as resp:
        assert resp.status == 400
        assert orjson.loads(await resp.read())["error"]["message"]
    assert pop.state.as_dict() == before


async def test_echo_reports_what_was_sent(start_pop: StartPop, http: aiohttp.ClientSession) -> None:
    pop = await start_pop()
    parts = [b"first part|", bytes(range(256)) * 40, b"|last"]
    payload = b"".join(parts)

    async def chunked() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    url = f"{pop.url}/v2/some%20thing/x?b=2&a=%20one&a=two"
    headers = {"X-Custom": "yes", "X-Session-ID": "s-9"}
    async with http.put(url, data=chunked(), headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["X-Backend-ID"] == "pop-1"
        echo = orjson.loads(await resp.read())
    assert echo["method"] == "PUT"
    assert echo["path"] == "/v2/some%20thing/x"
    assert echo["query_string"] == "b=2&a=%20one&a=two"
    assert echo["headers"]["X-Custom"] == "yes"
    assert echo["headers"]["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in echo["headers"]
    assert echo["body_len"] == len(payload)
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()
    [record] = pop.requests
    assert (record.method, record.session_id, record.body_len) == ("PUT", "s-9", len(payload))


async def test_echo_covers_unrouted_methods_and_combines_repeated_headers(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    headers = [("X-Multi", "a"), ("X-Multi", "b")]
    for method, path in (("GET", CHAT), ("POST", "/version"), ("DELETE", "/")):
        async with http.request(method, f"{pop.url}{path}", headers=headers) as resp:
            assert resp.status == 200
            echo = orjson.loads(await resp.read())
        assert (echo["method"], echo["path"], echo["body_len"]) == (method, path, 0)
        assert echo["body_sha256"] == hashlib.sha256(b"").hexdigest()
        assert echo["headers"]["X-Multi"] == "a, b"
        assert ["X-Multi", "b"] in echo["header_items"]


async def test_invalid_json_body_is_a_400(start_pop: StartPop, http: aiohttp.ClientSession) -> None:
    pop = await start_pop()
    for body in (b"{nope", b'"a string"'):
        async with http.post(f"{pop.url}{CHAT}", data=body) as resp:
            assert resp.status == 400
            assert resp.headers["X-Prompt-Version"] == "v1"
            error = orjson.loads(await resp.read())["error"]
            assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("fmt", ["json_object", "json_schema"])
async def test_structured_output_validity_follows_json_valid(
    start_pop: StartPop, http: aiohttp.ClientSession, fmt: str
) -> None:
    pop = await start_pop(completion_tokens=4)
    body = chat_body(response_format={"type": fmt})
    async with http.post(f"{pop.url}{CHAT}", json=body) as resp:
        content = orjson.loads(await resp.read())["choices"][0]["message"]["content"]
    doc = orjson.loads(content)
    assert doc["backend_id"] == "pop-1"
    assert doc["prompt"] == "v1"
    async with http.post(f"{pop.url}{CHAT}", json={**body, "stream": True}) as resp:
        streamed = "".join(
            orjson.loads(d)["choices"][0]["delta"].get("content", "")
            for _, d in await read_sse(resp)
            if d != "[DONE]"
        )
    assert streamed == content
    pop.state.json_valid = False
    async with http.post(f"{pop.url}{CHAT}", json=body) as resp:
        broken = orjson.loads(await resp.read())["choices"][0]["message"]["content"]
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(broken)


async def test_text_completions(start_pop: StartPop, http: aiohttp.ClientSession) -> None:
    pop = await start_pop(completion_tokens=2)
    url = f"{pop.url}/v1/completions"
    async with http.post(url, json={"model": "x", "prompt": "hi"}) as resp:
        body = orjson.loads(await resp.read())
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "[pop-1 v1] token token"
    assert body["usage"]["completion_tokens"] == 2
    stream_body = {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(url, json=stream_body) as resp:
        events = [d for _, d in await read_sse(resp)]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "[pop-1 v1] token token"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 2


async def test_embeddings_are_deterministic(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    url = f"{pop.url}/v1/embeddings"
    async with http.post(url, json={"input": ["alpha", "beta", "alpha"]}) as resp:
        body = orjson.loads(await resp.read())
    vectors = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert vectors[0] == vectors[2] != vectors[1]
    assert len(vectors[0]) == 8
    assert abs(sum(v * v for v in vectors[0]) - 1.0) < 1e-9
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    async with http.post(
        url, json={"input": "alpha", "dimensions": 4, "encoding_format": "base64"}
    ) as resp:
        packed = orjson.loads(await resp.read())["data"][0]["embedding"]
    assert len(struct.unpack("<4f", base64.b64decode(packed))) == 4
    async with http.post(url, json={"input": []}) as resp:
        assert resp.status == 400


async def test_responses_api(start_pop: StartPop, http: aiohttp.ClientSession) -> None:
    pop = await start_pop(completion_tokens=3, model="m5")
    url = f"{pop.url}/v1/responses"
    async with http.post(url, json={"model": "x", "input": "hi"}) as resp:
        body = orjson.loads(await resp.read())
    assert (body["object"], body["status"], body["model"]) == ("response", "completed", "m5")
    assert body["output"][0]["content"][0]["text"] == "[pop-1 v1] token token token"
    assert body["usage"]["output_tokens"] == 3
    async with http.post(url, json={"input": "hi", "stream": True}) as resp:
        events = [orjson.loads(d) for _, d in await read_sse(resp)]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == "[pop-1 v1] token token token"
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["usage"]["total_tokens"] > 3


async def test_sim_requests_and_reset_endpoints(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    for session in ("a", "b", "a"):
        async with http.post(f"{pop.url}/x", headers={"X-Session-ID": session}) as resp:
            assert resp.status == 200
    async with http.get(f"{pop.url}/_sim/requests", params={"session_id": "a"}) as resp:
        listing = orjson.loads(await resp.read())
    assert listing["count"] == 2
    assert {r["session_id"] for r in listing["requests"]} == {"a"}
    async with http.get(f"{pop.url}/_sim/state") as resp:
        assert orjson.loads(await resp.read())["counters"]["requests"] == 3
    async with http.post(f"{pop.url}/_sim/reset") as resp:
        assert orjson.loads(await resp.read()) == {"cleared": 3}
    assert pop.requests == []
    assert pop.counters.requests == 0
    async with http.get(f"{pop.url}/_sim/nothing") as resp:
        assert resp.status == 404
    assert pop.requests == []  # control traffic is never recorded


async def test_records_are_bounded(http: aiohttp.ClientSession) -> None:
    state = PopState.create("pop-b", "r1", "v1")
    async with SimPop(state, max_records=3) as pop:
        for i in range(5):
            async with http.get(f"{pop.url}/n/{i}") as resp:
                assert resp.status == 200
        assert [r.path for r in pop.requests] == ["/n/2", "/n/3", "/n/4"]
        assert pop.counters.requests == 5


async def test_repr_and_lifecycle() -> None:
    pop = SimPop(PopState.create("us-east-1", "us-east", "v47"))
    assert repr(pop) == ("SimPop(id='us-east-1', region='us-east', version='prompt=v47', url=None)")
    with pytest.raises(RuntimeError):
        _ = pop.url
    await pop.start()
    try:
        assert pop.port > 0
        assert repr(pop).endswith(f"url='http://127.0.0.1:{pop.port}')")
        with pytest.raises(RuntimeError):
            await pop.start()
    finally:
        await pop.stop()
    await pop.stop()  # idempotent


def test_state_validates_on_construction() -> None:
    with pytest.raises(ValueError, match="ttfb_ms"):
        PopState.create("p", "r", "v1", ttfb_ms=-5)
    with pytest.raises(TypeError):
        PopState.create("p", "r", "v1", parser="x", version=VersionBundle("v2"))


async def test_every_nth_json_answer_is_invalid_with_json_invalid_every(
    start_pop: StartPop, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop(completion_tokens=4, json_invalid_every=3)
    body = chat_body(response_format={"type": "json_object"})
    valid = []
    for _ in range(9):
        async with http.post(f"{pop.url}{CHAT}", json=body) as resp:
            content = orjson.loads(await resp.read())["choices"][0]["message"]["content"]
        try:
            orjson.loads(content)
            valid.append(True)
        except orjson.JSONDecodeError:
            valid.append(False)
        async with http.post(f"{pop.url}{CHAT}", json=chat_body()) as resp:
            assert resp.status == 200  # plain answers do not count towards n
    assert valid == [True, True, False] * 3
