"""OpenAI-shaped bodies the simulated POP answers with: completions, chunks, embeddings."""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

_ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}
_JSON_FORMATS = frozenset({"json_object", "json_schema"})
_MAX_EMBEDDING_DIMENSIONS = 4096


def error_type_for(status: int) -> str:
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, error_type: str) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": None}}
    )


def sse(payload: Mapping[str, Any], event: str | None = None) -> bytes:
    data = b"data: " + orjson.dumps(payload) + b"\n\n"
    return b"event: " + event.encode() + b"\n" + data if event else data


SSE_DONE = b"data: [DONE]\n\n"


def wants_json(body: Mapping[str, Any]) -> bool:
    """Whether the request asks for structured output (Chat or Responses API spelling)."""
    formats: list[object] = []
    if isinstance(rf := body.get("response_format"), Mapping):
        formats.append(rf.get("type"))
    if isinstance(text := body.get("text"), Mapping) and isinstance(
        fmt := text.get("format"), Mapping
    ):
        formats.append(fmt.get("type"))
    return any(f in _JSON_FORMATS for f in formats)


def content_pieces(
    backend_id: str, prompt: str, tokens: int, *, json_mode: bool, json_valid: bool
) -> list[str]:
    """The completion text split into the pieces a stream sends, one per token."""
    if not json_mode:
        if tokens == 0:
            return []
        return [f"[{backend_id} {prompt}] token"] + [" token"] * (tokens - 1)
    doc = orjson.dumps(
        {"backend_id": backend_id, "prompt": prompt, "answer": " ".join(["token"] * tokens)}
    ).decode()
    if not json_valid:
        # Cut off like a generation that stopped early: the shape parsers fail on.
        doc = doc[:-1]
    count = max(tokens, 1)
    step, extra = divmod(len(doc), count)
    pieces, start = [], 0
    for i in range(count):
        end = start + step + (1 if i < extra else 0)
        pieces.append(doc[start:end])
        start = end
    return pieces


@dataclass(frozen=True, slots=True)
class Reply:
    """One generated answer, rendered into whichever API shape was asked for."""

    id: str
    created: int
    model: str
    pieces: list[str]
    prompt_tokens: int
    include_usage: bool = False
    text: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", "".join(self.pieces))

    def usage(self) -> dict[str, int]:
        done = len(self.pieces)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """SSE frames: ``head`` and ``tail`` go out at once, ``tokens`` are paced."""

    head: list[bytes]
    tokens: list[bytes]
    tail: list[bytes]


def chat_completion(reply: Reply) -> dict[str, Any]:
    return {
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": reply.usage(),
    }


def _chunk(reply: Reply, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": reply.id,
        "object": obj,
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
    }
    if reply.include_usage:
        # OpenAI sends "usage": null on every chunk but the last when usage is asked for.
        chunk["usage"] = None
    return chunk


def _usage_tail(reply: Reply, obj: str) -> list[bytes]:
    if not reply.include_usage:
        return [SSE_DONE]
    final = _chunk(reply, obj, []) | {"usage": reply.usage()}
    return [sse(final), SSE_DONE]


def chat_stream(reply: Reply) -> StreamPlan:
    obj = "chat.completion.chunk"
    tokens = []
    for i, piece in enumerate(reply.pieces):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        tokens.append(sse(_chunk(reply, obj, [choice])))
    finish = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    return StreamPlan([], tokens, [sse(_chunk(reply, obj, [finish])), *_usage_tail(reply, obj)])


def text_completion(reply: Reply) -> dict[str, Any]:
    return {
        "id": reply.id,
        "object": "text_completion",
        "created": reply.created,
        "model": reply.model,
        "choices": [{"text": reply.text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": reply.usage(),
    }


def text_stream(reply: Reply) -> StreamPlan:
    obj = "text_completion"
    tokens = [
        sse(_chunk(reply, obj, [{"text": p, "index": 0, "logprobs": None, "finish_reason": None}]))
        for p in reply.pieces
    ]
    finish = {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}
    return StreamPlan([], tokens, [sse(_chunk(reply, obj, [finish])), *_usage_tail(reply, obj)])


def _response_message(reply: Reply, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": reply.text, "annotations": []}]
    return {
        "type": "message",
        "id": f"msg_{reply.id}",
        "status": status,
        "role": "assistant",
        "content": content if status == "completed" else [],
    }


def response_object(reply: Reply, status: str = "completed") -> dict[str, Any]:
    done = status == "completed"
    usage = reply.usage()
    return {
        "id": f"resp_{reply.id}",
        "object": "response",
        "created_at": reply.created,
        "status": status,
        "model": reply.model,
        "output": [_response_message(reply, status)] if done else [],
        "usage": {
            "input_tokens": usage["prompt_tokens"],
            "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
        }
        if done
        else None,
    }


def response_stream(reply: Reply) -> StreamPlan:
    item_id = f"msg_{reply.id}"
    seq = iter(range(1_000_000_000))

    def event(kind: str, **payload: Any) -> bytes:
        return sse({"type": kind, "sequence_number": next(seq), **payload}, event=kind)

    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": reply.text, "annotations": []}
    head = [
        event("response.created", response=response_object(reply, "in_progress")),
        event(
            "response.output_item.added",
            output_index=0,
            item=_response_message(reply, "in_progress"),
        ),
        event("response.content_part.added", **where, part=part | {"text": ""}),
    ]
    tokens = [event("response.output_text.delta", **where, delta=p) for p in reply.pieces]
    tail = [
        event("response.output_text.done", **where, text=reply.text),
        event("response.content_part.done", **where, part=part),
        event(
            "response.output_item.done",
            output_index=0,
            item=_response_message(reply, "completed"),
        ),
        event("response.completed", response=response_object(reply)),
    ]
    return StreamPlan(head, tokens, tail)


def _embedding_inputs(raw: object) -> list[str | list[int]]:
    def is_tokens(value: object) -> bool:
        return isinstance(value, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value
        )

    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if is_tokens(raw):
            return [list(raw)]
        if all(isinstance(item, str) or (is_tokens(item) and item) for item in raw):
            return list(raw)
    raise ValueError("input must be a string, a list of strings, or token id list(s)")


def _vector(item: str | list[int], dims: int) -> list[float]:
    digest = hashlib.shake_256(orjson.dumps(item)).digest(2 * dims)
    raw = [
        (int.from_bytes(digest[i : i + 2], "big") / 32767.5) - 1.0 for i in range(0, 2 * dims, 2)
    ]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return [v / norm for v in raw]


def embeddings(body: Mapping[str, Any], model: str, default_dims: int = 8) -> dict[str, Any]:
    """A deterministic unit vector per input; raises ``ValueError`` on a malformed request."""
    items = _embedding_inputs(body.get("input"))
    dims = body.get("dimensions", default_dims)
    if isinstance(dims, bool) or not isinstance(dims, int):
        raise ValueError("dimensions must be an integer")
    if not 1 <= dims <= _MAX_EMBEDDING_DIMENSIONS:
        raise ValueError(f"dimensions must be between 1 and {_MAX_EMBEDDING_DIMENSIONS}")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ValueError("encoding_format must be 'float' or 'base64'")
    data = []
    for index, item in enumerate(items):
        vector = _vector(item, dims)
        embedding: list[float] | str = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(len(i.split()) if isinstance(i, str) else len(i) for i in items)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
