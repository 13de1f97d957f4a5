"""Recognising a continuing conversation from the request body alone."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.core.continuation import continues_conversation


def body(document: object) -> bytes:
    return orjson.dumps(document)


@pytest.mark.parametrize(
    "document",
    [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                      {"role": "user", "content": "and?"}]},
        {"messages": [{"role": "tool", "tool_call_id": "c1", "content": "42"}]},
        {"input": "next", "previous_response_id": "resp_123"},
        {"input": "next", "conversation": "conv_1"},
        {"input": "next", "conversation": {"id": "conv_1"}},
        {"input": [{"role": "assistant", "content": "earlier"}, {"role": "user", "content": "x"}]},
        {"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]},
    ],
)
def test_an_earlier_answer_in_the_request_is_a_continuation(document: object) -> None:
    assert continues_conversation(body(document))


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"",
        b"{not json",
        body([{"role": "assistant"}]),
        body({"messages": [{"role": "system", "content": "be nice"},
                           {"role": "user", "content": "hi"}]}),
        body({"input": "hello"}),
        body({"input": "hello", "previous_response_id": ""}),
        body({"input": "hello", "previous_response_id": None, "conversation": {"id": 3}}),
        body({"messages": "assistant"}),
        body({"messages": [["assistant"], "assistant", None]}),
    ],
)
def test_a_first_turn_or_an_unreadable_body_is_not_a_continuation(raw: bytes | None) -> None:
    assert not continues_conversation(raw)


roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "x"])


@given(st.lists(roles, max_size=6))
@example(["system", "user"])
@example(["user", "assistant"])
def test_a_chat_continues_exactly_when_a_model_or_tool_answered_before(
    sequence: list[str],
) -> None:
    messages = [{"role": role, "content": "c"} for role in sequence]
    expected = any(role in ("assistant", "tool", "function") for role in sequence)
    assert continues_conversation(body({"messages": messages})) is expected
