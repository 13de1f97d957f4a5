"""Session-id extraction from a header, a cookie or a JSON body field, and its validation."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

import orjson

from proxy.errors import BadRequest

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from proxy.config import SessionSource

# C0, DEL and C1: a session id ends up in log lines, Redis keys and audit records,
# where a control character could forge or break a record.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_UNSET: Final = object()


def needs_body(sources: Sequence[SessionSource]) -> bool:
    """Whether any source reads the request body (so the body must be buffered)."""
    return any(source.kind == "body" for source in sources)


def extract_session_id(
    sources: Sequence[SessionSource],
    headers: Mapping[str, str],
    cookies: Mapping[str, str],
    body: bytes | None,
    *,
    max_bytes: int = 256,
) -> str | None:
    """The session id from the first source, in order, that carries one; None if none does.

    ``headers`` must be case-insensitive (e.g. a multidict). A missing or empty value,
    a body that is absent or not a JSON object, or a body field that is neither a string
    nor an integer counts as "this source has no id". A found id that is too long or
    contains a control character raises ``BadRequest`` (it is not skipped: a client that
    sent an id meant it, and routing it as a different session would break its pin).
    """
    parsed: object = _UNSET
    for source in sources:
        value: str | None
        if source.kind == "header":
            value = _single_header(headers, source)
        elif source.kind == "cookie":
            value = cookies.get(source.name)
        else:
            if body is None:
                continue
            if parsed is _UNSET:
                parsed = _parse_json(body)
            value = _walk(parsed, source.name)
        if value:
            _validate(value, source, max_bytes)
            return value
    return None


def _single_header(headers: Mapping[str, str], source: SessionSource) -> str | None:
    # Two different ids in one request is ambiguous; picking either could break a pin.
    getall = getattr(headers, "getall", None)
    if getall is None:
        return headers.get(source.name)
    values = set(getall(source.name, ()))
    if len(values) > 1:
        raise BadRequest(
            f"{_describe(source)}: the header appears more than once with different values",
            code="invalid_session_id",
        )
    return values.pop() if values else None


def _parse_json(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        # Not ours to reject: the backend will answer a malformed body properly.
        return None


def _walk(document: object, path: str) -> str | None:
    node = document
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    if isinstance(node, str):
        return node
    # bool is an int subclass, but True is not anyone's session id.
    if isinstance(node, int) and not isinstance(node, bool):
        return str(node)
    return None


def _describe(source: SessionSource) -> str:
    what = {"header": "header", "cookie": "cookie", "body": "body field"}[source.kind]
    return f"session id from {what} {source.name}"


def _validate(value: str, source: SessionSource, max_bytes: int) -> None:
    # The id itself is never echoed back: it may be long, binary or someone's secret.
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise BadRequest(
            f"{_describe(source)} is not valid UTF-8",
            code="invalid_session_id",
        ) from exc
    if size > max_bytes:
        raise BadRequest(
            f"{_describe(source)} is longer than {max_bytes} bytes",
            code="invalid_session_id",
        )
    bad = _CONTROL.search(value)
    if bad is not None:
        raise BadRequest(
            f"{_describe(source)} contains a control character "
            f"(U+{ord(bad.group()):04X} at position {bad.start()})",
            code="invalid_session_id",
        )
