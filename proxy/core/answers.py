"""What an OpenAI-shaped answer says: its token usage and its content.

Pure functions over bytes and parsed JSON, used by the response taps (usage.py).
Chat Completions, legacy Completions, Embeddings and the Responses API name things
differently (``prompt_tokens`` / ``input_tokens``, ``choices`` / ``output``); each
function accepts all of them and answers None for anything it does not recognise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from proxy.core.events import Usage

if TYPE_CHECKING:
    from collections.abc import Mapping


def delta_text(event: object) -> str | None:
    """The content piece of one streamed event (chat delta or Responses text delta)."""
    if not isinstance(event, dict):
        return None
    choices = event.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        return content if isinstance(content, str) else None
    if event.get("type") == "response.output_text.delta":
        piece = event.get("delta")
        return piece if isinstance(piece, str) else None
    return None


def usage_of_event(payload: bytes) -> Usage | None:
    """The usage in one SSE data payload (a final chunk, or ``response.completed``)."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict):
        return None
    usage = usage_of(event)
    if usage is None and isinstance(response := event.get("response"), dict):
        usage = usage_of(response)  # Responses API: response.completed
    return usage


def usage_of(doc: Mapping[str, object]) -> Usage | None:
    """The ``usage`` object of a parsed answer, as a ``Usage``."""
    raw = doc.get("usage")
    return _usage_from(raw) if isinstance(raw, dict) else None


def _usage_from(raw: Mapping[str, object]) -> Usage | None:
    prompt = _count(raw.get("prompt_tokens", raw.get("input_tokens")))
    completion = _count(raw.get("completion_tokens", raw.get("output_tokens", 0)))
    if prompt is None or completion is None:
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def usage_in_tail(data: bytes) -> Usage | None:
    """The last ``"usage": {...}`` object in ``data``, parsed on its own."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    start = data.find(b"{", at + 7)
    if start < 0 or data[at + 7 : start].strip() != b":":
        return None
    end = _object_end(data, start)
    if end < 0:
        return None
    try:
        raw = orjson.loads(data[start:end])
    except orjson.JSONDecodeError:
        return None
    return _usage_from(raw) if isinstance(raw, dict) else None


def _object_end(data: bytes, start: int) -> int:
    """Index past the ``}`` closing the object at ``start`` (usage holds no strings)."""
    depth, i = 0, start
    while True:
        close = data.find(b"}", i)
        if close < 0:
            return -1
        opened = data.find(b"{", i, close)
        if opened >= 0:
            depth, i = depth + 1, opened + 1
            continue
        depth, i = depth - 1, close + 1
        if depth == 0:
            return i


def answer_text(doc: Mapping[str, object]) -> str | None:
    """The assistant's message content: Chat Completions or Responses API shape."""
    choices = doc.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        return content if isinstance(content, str) else None
    output = doc.get("output")
    if not isinstance(output, list):
        return None
    texts = [
        part["text"]
        for item in output
        if isinstance(item, dict) and item.get("type") == "message"
        for part in item.get("content") or ()
        if isinstance(part, dict)
        and part.get("type") == "output_text"
        and isinstance(part.get("text"), str)
    ]
    return "".join(texts) if texts else None


def parses_as_json(text: str) -> bool:
    """Whether ``text`` is a JSON document (what a JSON-mode answer must be)."""
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True
