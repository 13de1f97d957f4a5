"""The response tap reads usage and JSON validity however the body is cut into chunks."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.core.events import Usage
from proxy.sim import openai
from proxy.telemetry.usage import JsonTap, SseTap, TapLimits, TapResult, asked_for_json, new_tap

LIMITS = TapLimits()


def reply(*, tokens: int = 5, json_mode: bool = False, json_valid: bool = True,
          include_usage: bool = True) -> openai.Reply:
    pieces = openai.content_pieces("pop-1", "v47", tokens, json_mode=json_mode,
                                   json_valid=json_valid)
    return openai.Reply(id="x", created=1, model="m", pieces=pieces, prompt_tokens=11,
                        include_usage=include_usage)


def sse_body(plan: openai.StreamPlan) -> bytes:
    return b"".join([*plan.head, *plan.tokens, *plan.tail])


def run(tap: SseTap | JsonTap, body: bytes, cuts: list[int]) -> TapResult:
    start = 0
    for cut in [*sorted(cuts), len(body)]:
        if cut > start:
            tap.feed(body[start:cut])
            start = cut
    return tap.finish()


def cut_points(body: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(body)), max_size=12)


CHAT_STREAM = sse_body(openai.chat_stream(reply()))
JSON_STREAM_BAD = sse_body(openai.chat_stream(reply(json_mode=True, json_valid=False)))
JSON_STREAM_OK = sse_body(openai.chat_stream(reply(json_mode=True)))
RESPONSES_STREAM = sse_body(openai.response_stream(reply(json_mode=True, json_valid=False)))


@given(cut_points(CHAT_STREAM))
def test_usage_from_the_final_chunk_of_a_chat_stream(cuts: list[int]) -> None:
    result = run(SseTap(json_mode=False, limits=LIMITS), CHAT_STREAM, cuts)
    assert result == TapResult(Usage(11, 5), None, "m")


@given(cut_points(CHAT_STREAM))
def test_crlf_streams_read_the_same(cuts: list[int]) -> None:
    body = CHAT_STREAM.replace(b"\n", b"\r\n")
    result = run(SseTap(json_mode=False, limits=LIMITS), body, cuts)
    assert result == TapResult(Usage(11, 5), None, "m")


@given(cut_points(JSON_STREAM_BAD), st.booleans())
def test_streamed_json_content_is_judged(cuts: list[int], valid: bool) -> None:
    body = JSON_STREAM_OK if valid else JSON_STREAM_BAD
    cuts = [c for c in cuts if c <= len(body)]
    result = run(SseTap(json_mode=True, limits=LIMITS), body, cuts)
    assert result == TapResult(Usage(11, 5), valid, "m")


@given(cut_points(RESPONSES_STREAM))
def test_responses_api_stream(cuts: list[int]) -> None:
    result = run(SseTap(json_mode=True, limits=LIMITS), RESPONSES_STREAM, cuts)
    assert result == TapResult(Usage(11, 5), False, "m")


def test_a_stream_without_usage_has_none() -> None:
    body = sse_body(openai.chat_stream(reply(include_usage=False)))
    assert run(SseTap(json_mode=False, limits=LIMITS), body, []) == TapResult(None, None, "m")


def test_an_event_over_the_cap_is_skipped_not_misread() -> None:
    limits = TapLimits(max_event_bytes=200)
    huge = b'data: {"choices":[{"delta":{"content":"' + b"x" * 1000 + b'"}}]}\n\n'
    tail = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    body = huge + tail + b"data: [DONE]\n\n"
    # Cut inside the huge event and right between the two newlines that end it.
    cut = len(huge) - 1
    result = run(SseTap(json_mode=True, limits=limits), body, [50, 300, cut])
    assert result == TapResult(Usage(3, 4), None)  # usage still read; content unjudgeable
    # When the oversized event is the last one, there is no usage rather than a stale one.
    body = tail + huge
    assert run(SseTap(json_mode=False, limits=limits), body, [10, 500]).usage is None


def test_content_over_the_cap_is_not_judged() -> None:
    limits = TapLimits(max_content_bytes=10)
    result = run(SseTap(json_mode=True, limits=limits), JSON_STREAM_BAD, [])
    assert result == TapResult(Usage(11, 5), None, "m")


def test_a_last_event_without_its_blank_line_still_counts() -> None:
    body = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n'
    assert run(SseTap(json_mode=False, limits=LIMITS), body, [7]).usage == Usage(1, 2)


@pytest.mark.parametrize(
    ("doc", "json_mode", "expected"),
    [
        (openai.chat_completion(reply()), False, TapResult(Usage(11, 5), None, "m")),
        (openai.chat_completion(reply(json_mode=True)), True,
         TapResult(Usage(11, 5), True, "m")),
        (
            openai.chat_completion(reply(json_mode=True, json_valid=False)),
            True,
            TapResult(Usage(11, 5), False, "m"),
        ),
        (
            openai.response_object(reply(json_mode=True, json_valid=False)),
            True,
            TapResult(Usage(11, 5), False, "m"),
        ),
        (openai.text_completion(reply()), False, TapResult(Usage(11, 5), None, "m")),
        (openai.embeddings({"input": "a b c"}, "e"), False, TapResult(Usage(3, 0), None, "e")),
        ({"object": "list", "data": []}, False, TapResult(None, None)),
        ({"usage": None, "id": "x"}, False, TapResult(None, None)),
    ],
)
def test_json_bodies(doc: dict[str, object], json_mode: bool, expected: TapResult) -> None:
    body = orjson.dumps(doc)
    for cuts in ([], [1, 5, len(body) // 2], list(range(0, len(body), 7))):
        assert run(JsonTap(json_mode=json_mode, limits=LIMITS), body, cuts) == expected


def test_usage_is_read_from_the_tail_of_a_long_body() -> None:
    doc = openai.chat_completion(reply())
    doc["choices"][0]["message"]["content"] = "x" * 300_000
    body = orjson.dumps(doc)
    tap = JsonTap(json_mode=False, limits=TapLimits(tail_bytes=1000))
    found = run(tap, body, list(range(0, len(body), 4096)))
    assert found.usage == Usage(11, 5)
    assert found.model is None  # its start was not kept: no model rather than a guess
    assert len(tap._chunks) <= 2  # only the tail is held


def test_a_json_body_over_the_cap_has_no_answer() -> None:
    body = orjson.dumps(openai.chat_completion(reply(json_mode=True)))
    tap = JsonTap(json_mode=True, limits=TapLimits(max_body_bytes=len(body) - 1))
    assert run(tap, body, [10]) == TapResult(None, None)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"response_format": {"type": "json_object"}}, True),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, True),
        ({"response_format": {"type": "text"}}, False),
        ({"text": {"format": {"type": "json_schema"}}}, True),
        ({"messages": [{"role": "user", "content": '{"response_format": 1}'}]}, False),
        ({"encoding_format": "float"}, False),
        ({}, False),
    ],
)
def test_asked_for_json(body: dict[str, object], expected: bool) -> None:
    assert asked_for_json(orjson.dumps(body)) is expected


def test_asked_for_json_edge_cases() -> None:
    assert asked_for_json(None) is False
    assert asked_for_json(b"") is False
    assert asked_for_json(b'{"response_format": ') is False  # not JSON: not ours to judge
    assert asked_for_json(b'["response_format"]') is False


def test_new_tap_by_status_and_content_type() -> None:
    ask = orjson.dumps({"response_format": {"type": "json_object"}})
    sse = new_tap(200, "text/event-stream", None, ask, LIMITS)
    assert isinstance(sse, SseTap)
    assert sse._json_mode
    plain = new_tap(200, "application/json", "identity", b"{}", LIMITS)
    assert isinstance(plain, JsonTap)
    assert not plain._json_mode
    assert new_tap(200, "application/json", "gzip", ask, LIMITS) is None
    assert new_tap(200, "text/plain", None, ask, LIMITS) is None
    assert new_tap(400, "application/json", None, ask, LIMITS) is None


def test_a_long_event_is_joined_once_not_per_chunk() -> None:
    # The Responses API's final event carries the whole answer: hundreds of KiB.
    final = orjson.dumps({"type": "response.completed", "response": {
        "output": [{"type": "message", "content": [{"type": "output_text",
                                                    "text": "x" * 300_000}]}],
        "usage": {"input_tokens": 7, "output_tokens": 9}}})
    body = b"event: response.completed\r\ndata: " + final + b"\r\n\r\n"
    tap = SseTap(json_mode=False, limits=LIMITS)
    held = []
    for start in range(0, len(body), 4096):
        tap.feed(body[start:start + 4096])
        held.append(len(tap._parts))
    assert max(held) > 50  # kept as the chunks it came in until its end arrived
    assert held[-1] == 0
    assert tap.finish() == TapResult(Usage(7, 9), None)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"id":"x","model" : "gpt-4o\\u00e9","choices":[]}', "gpt-4o\u00e9"),
        # An escaped quote inside a string is never a key.
        (b'{"choices":[{"message":{"content":"say \\"model\\": \\"x\\""}}]}', None),
        (b'{"role":"model","content":"hi"}', None),
        (b'{"model":42}', None),
    ],
)
def test_the_answering_model_is_read_from_a_json_answer(body: bytes, expected: str | None) -> None:
    assert run(JsonTap(json_mode=False, limits=LIMITS), body, [3]).model == expected


def test_a_small_answer_that_does_not_parse_is_still_scanned() -> None:
    # Small answers are parsed whole; one that is not a JSON document (here, bytes after
    # it) is read by the scans, as before.
    body = b'{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2}} trailing'
    found = run(JsonTap(json_mode=False, limits=LIMITS), body, [5])
    assert found == TapResult(Usage(1, 2), None, "m")


# -- the tail scan against a full parse -----------------------------------------------------
# A JSON answer's usage is read from its tail without parsing the body (answers.py's
# usage_in_tail); it must say what a full parse of an OpenAI-shaped answer says, whatever
# the content holds and however the body is spaced and cut.

# Strings made of the pieces that could fool a byte scan: quotes, backslashes, braces
# and the keys it looks for.
_TRICKY = st.lists(
    st.sampled_from(['"', "\\", "{", "}", ":", ",", " ", "\n", "x", "é", "\u2028", "usage",
                     '"usage"', '"usage":{', '"usage": {"prompt_tokens": 1}', '"model"',
                     '\\"', "model", '"model":"fake"']),
    max_size=12,
).map("".join)
_COUNT = st.integers(0, 10**6)


@st.composite
def openai_answers(draw: st.DrawFn) -> dict[str, object]:
    """A chat completion or Responses API object, usage last, content of any text."""
    usage: dict[str, object] = {
        ("input_tokens" if draw(st.booleans()) else "prompt_tokens"): draw(_COUNT),
        "completion_tokens": draw(_COUNT),
        "total_tokens": draw(_COUNT),
    }
    if draw(st.booleans()):  # newer servers nest details in usage
        usage["prompt_tokens_details"] = {"cached_tokens": draw(_COUNT)}
        usage["completion_tokens_details"] = {"reasoning_tokens": draw(_COUNT)}
    content = draw(_TRICKY) + "x" * draw(st.sampled_from([0, 3000]))  # past a short tail
    doc: dict[str, object] = {"id": draw(_TRICKY), "object": "chat.completion",
                              "model": draw(st.text(min_size=1, max_size=20))}
    if draw(st.booleans()):
        doc["choices"] = [{"index": 0, "message": {"role": "assistant", "content": content},
                           "finish_reason": "stop"}]
    else:
        doc["output"] = [{"type": "message", "content": [{"type": "output_text",
                                                          "text": content}]}]
    doc["usage"] = draw(st.none() | st.just(usage))
    if draw(st.booleans()):  # vLLM writes a few scalar fields after usage
        doc["prompt_logprobs"] = None
        doc["system_fingerprint"] = draw(_TRICKY)
    return doc


def _spaced(doc: dict[str, object], style: int) -> bytes:
    import json

    if style == 0:
        return orjson.dumps(doc)
    if style == 1:
        return json.dumps(doc).encode()  # ", " and ": ", ASCII escapes
    return json.dumps(doc, ensure_ascii=False, indent=2).encode()


def _after_usage(fingerprint: str) -> dict[str, object]:
    return {"id": "x", "model": "m", "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4},
            "system_fingerprint": fingerprint}


@given(openai_answers(), st.integers(0, 2), st.lists(st.integers(0, 4096), max_size=8),
       st.sampled_from([64 * 1024, 1024]))
# Found by this test: the bytes "usage" ending a string after the usage object were
# taken for its key, and the answer's usage was lost.
@example(_after_usage("usage"), 0, [], 64 * 1024)
@example(_after_usage('x"usage'), 1, [], 64 * 1024)
@example(_after_usage('x\\'), 0, [], 64 * 1024)  # a string ending in a backslash
@example({"usage": None, "model": "m", "x": "usage"}, 2, [], 64 * 1024)
def test_the_tail_scan_agrees_with_a_full_parse(
    doc: dict[str, object], style: int, cuts: list[int], tail_bytes: int,
) -> None:
    from proxy.core.answers import model_of, usage_of

    body = _spaced(doc, style)
    parsed = orjson.loads(body)
    tap = JsonTap(json_mode=False, limits=TapLimits(tail_bytes=tail_bytes))
    found = run(tap, body, [c % (len(body) + 1) for c in cuts])
    assert found.usage == usage_of(parsed)
    # The model is read from the head, only while the head is still kept.
    if len(body) <= tail_bytes:
        assert found.model == model_of(parsed)
