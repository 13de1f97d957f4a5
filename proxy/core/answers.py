"""What an OpenAI-shaped answer says: its token usage and its content.

Pure functions over bytes and parsed JSON, used by the response taps (usage.py).
Chat Completions, legacy Completions, Embeddings and the Responses API name things
differently (``prompt_tokens`` / ``input_tokens``, ``choices`` / ``output``); each
function accepts all of them and answers None for anything it does not recognise.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

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


def facts_of_event(payload: bytes) -> tuple[Usage | None, str | None]:
    """The usage and the answering model named in one SSE data payload (a final chunk,
    or the Responses API's ``response.completed``, which nests both in ``response``)."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(event, dict):
        return None, None
    usage, model = usage_of(event), model_of(event)
    if isinstance(response := event.get("response"), dict):
        usage = usage or usage_of(response)
        model = model or model_of(response)
    return usage, model


def model_of(doc: Mapping[str, object]) -> str | None:
    """The ``model`` a parsed request or answer names (at most 256 characters)."""
    model = doc.get("model")
    return model if isinstance(model, str) and 0 < len(model) <= 256 else None


# The first "model" key with a string value; as a key it is followed by ':' (a quote
# inside a JSON string is escaped, so the bytes '"model"' are a key or the value "model").
_MODEL_KEY: Final = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')


def model_in_head(data: bytes) -> str | None:
    """The answering model of a JSON answer whose start is in ``data``.

    OpenAI-shaped answers name the model near the top, before ``choices``/``output``,
    whose strings are escaped; the first such key is the top-level one.
    """
    match = _MODEL_KEY.search(data)
    if match is None:
        return None
    try:
        value = orjson.loads(b'"' + match.group(1) + b'"')
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None


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
    """The last ``"usage": {...}`` object in ``data``, parsed on its own.

    The bytes ``"usage"`` are the key only when their opening quote is not escaped and a
    ``:`` follows; anywhere else they end a string value (``"system_fingerprint":
    "usage"`` after the usage object), and the search goes on before them.
    """
    end = len(data)
    while True:
        at = data.rfind(b'"usage"', 0, end)
        if at < 0:
            return None
        if _unescaped(data, at) and data[at + 7 : at + 71].lstrip()[:1] == b":":
            break
        end = at
    colon = data.find(b":", at + 7)
    start = colon + 1
    while data[start : start + 1] in _JSON_SPACE:
        start += 1
    if data[start : start + 1] != b"{":
        return None  # "usage": null, or not an object: no usage
    end = _object_end(data, start)
    if end < 0:
        return None
    try:
        raw = orjson.loads(data[start:end])
    except orjson.JSONDecodeError:
        return None
    return _usage_from(raw) if isinstance(raw, dict) else None


_JSON_SPACE: Final = (b" ", b"\n", b"\r", b"\t")


def _unescaped(data: bytes, quote: int) -> bool:
    """Whether the quote at ``quote`` is not escaped (an even run of backslashes before it)."""
    i = quote
    while i > 0 and data[i - 1] == 0x5C:  # backslash
        i -= 1
    return (quote - i) % 2 == 0


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
