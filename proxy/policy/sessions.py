"""Session-id extraction from a header, a cookie or a JSON body field, and its validation."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from proxy.core.errors import BadRequest
from proxy.core.json_body import (
    ABSENT,
    PENDING,
    BodyKind,
    Found,
    HeldJson,
    PathResult,
    Pending,
    Unreadable,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from proxy.config.settings import SessionSource

# C0, DEL and C1: a session id ends up in log lines, Redis keys and audit records,
# where a control character could forge or break a record.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


BodyLookup = Callable[[str], PathResult | Pending]
"""The id at a dotted path of the request body, or ``PENDING`` while it streams in."""


def no_json_body(kind: BodyKind, content_encoding: str | None = None) -> BodyLookup:
    """The lookup for a body that is not read as JSON: none at all, another content type
    (a backend would not read it as JSON either), or a Content-Encoding not undone here."""
    if kind is BodyKind.ENCODED:
        unreadable = Unreadable(f"the body has Content-Encoding {content_encoding}")
        return lambda _path: unreadable
    return lambda _path: ABSENT


def extract_session_id(
    sources: Sequence[SessionSource],
    headers: Mapping[str, str],
    cookies: Mapping[str, str],
    body: bytes | None,
    *,
    max_bytes: int = 256,
) -> str | None:
    """The session id from a request whose JSON body (if any) is held whole.

    ``body`` is the JSON body's bytes, or None when the request has no JSON body.
    """
    lookup = HeldJson(body) if body is not None else no_json_body(BodyKind.NONE)
    found = resolve_session_id(sources, headers, cookies, lookup, max_bytes=max_bytes)
    assert found is not PENDING  # a held body settles every path
    return found


def resolve_session_id(
    sources: Sequence[SessionSource],
    headers: Mapping[str, str],
    cookies: Mapping[str, str],
    body: BodyLookup,
    *,
    max_bytes: int = 256,
) -> str | Pending | None:
    """The session id from the first source, in order, that carries one; None if none does.

    ``headers`` must be case-insensitive (e.g. a multidict). A missing or empty header or
    cookie, and a body path that is missing, null or "", count as "this source has no
    id". A body source that cannot be read (the body is not JSON, or the value at the
    path is neither a string nor an integer) raises ``BadRequest`` with code
    ``unreadable_session_id``: routing such a request unpinned would silently lose its
    session. ``PENDING`` means a body source must wait for more of a streamed body. A
    found id that is too long or contains a control character raises ``BadRequest``
    (it is not skipped: a client that sent an id meant it, and routing it as a different
    session would break its pin).
    """
    for source in sources:
        value: str | None
        if source.kind == "header":
            value = _single_header(headers, source)
        elif source.kind == "cookie":
            value = cookies.get(source.name)
        else:
            result = body(source.name)
            if result is PENDING:
                return PENDING
            if isinstance(result, Unreadable):
                raise BadRequest(
                    f"{_describe(source)} cannot be read: {result.reason}",
                    code="unreadable_session_id",
                    param=source.name,
                )
            value = result.value if isinstance(result, Found) else None
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
