"""Does a request continue a conversation? Read from the request itself (pure).

A session whose pin cannot be found is a new session only if the request says so.
The OpenAI APIs say when it does not:

- Chat Completions sends the whole conversation: a prior ``assistant`` turn (or a
  ``tool``/``function`` result, which answers an assistant's call) in ``messages``
  means a model already answered in this conversation.
- The Responses API continues with ``previous_response_id`` or ``conversation``, or
  sends prior output back as ``input`` items (an ``assistant`` message, a function
  call or its output, a reasoning item, an item reference).

Anything else, including a body that is absent (streamed through) or not JSON, is
not recognisably a continuation.
"""

from __future__ import annotations

from typing import Final

import orjson

_ANSWERED_ROLES: Final = frozenset({"assistant", "tool", "function"})
_OUTPUT_ITEMS: Final = frozenset(
    {"function_call", "function_call_output", "reasoning", "item_reference"}
)


def continues_conversation(body: bytes | None) -> bool:
    """Whether the request body carries an earlier answer of this conversation."""
    if not body:
        return False
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(document, dict):
        return False
    if _named(document.get("previous_response_id")) or _named(document.get("conversation")):
        return True
    return _has_answer(document.get("messages")) or _has_answer(document.get("input"))


def _named(value: object) -> bool:
    """A non-empty id, or an object carrying one (``{"id": "conv_..."}``)."""
    if isinstance(value, dict):
        value = value.get("id")
    return isinstance(value, str) and bool(value)


def _has_answer(items: object) -> bool:
    if not isinstance(items, list):
        return False
    for item in items:
        if not isinstance(item, dict):
            continue
        if item.get("role") in _ANSWERED_ROLES or item.get("type") in _OUTPUT_ITEMS:
            return True
    return False
