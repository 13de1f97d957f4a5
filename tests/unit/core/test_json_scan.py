"""The streamed session-id scan agrees with reading the whole body, split anywhere."""

from __future__ import annotations

import itertools
import json

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.core.json_body import (
    ABSENT,
    PENDING,
    BodyKind,
    Found,
    HeldJson,
    Unreadable,
    body_kind,
)
from proxy.core.json_scan import PathScanner

PATHS = ("metadata.session_id", "user", "a.b", "a")

KEYS = st.sampled_from(["metadata", "session_id", "user", "a", "b", "a.b", "?", "x"])
STRINGS = st.one_of(
    st.sampled_from(["", "s-1", "?", "a?b", "\ud800", "\udc00x", "\U0001f600", "\x00"]),
    st.text(max_size=8),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**64, max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    STRINGS,
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)
    ),
    max_leaves=12,
)


def encode(document: object, ascii_only: bool, bom: bool) -> bytes:
    # json.dumps writes NaN/Infinity and escapes lone surrogates, as a Python client does.
    text = json.dumps(document, ensure_ascii=ascii_only)
    raw = text.encode("utf-8", "surrogatepass")
    return b"\xef\xbb\xbf" + raw if bom else raw


def scan(raw: bytes, cuts: list[int], paths: tuple[str, ...] = PATHS) -> PathScanner:
    scanner = PathScanner(paths)
    bounds = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        scanner.feed(raw[start:end])
    return scanner


@settings(max_examples=300, deadline=None)
@given(
    document=DOCUMENTS,
    ascii_only=st.booleans(),
    bom=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
)
@example(document={"metadata": {"session_id": "\ud800"}}, ascii_only=True, bom=False, cuts=[])
@example(document={"metadata": {"session_id": 2**70}}, ascii_only=True, bom=False, cuts=[])
@example(document={"a": {"b": 1}, "?": 1}, ascii_only=True, bom=True, cuts=[1, 2])
# Found a bug: a BOM fed byte by byte left an empty piece, which ijson took for the end.
@example(document={"user": "u-1"}, ascii_only=True, bom=True, cuts=[1, 2, 3])
def test_a_settled_scan_is_what_the_whole_body_says(
    document: object, ascii_only: bool, bom: bool, cuts: list[int]
) -> None:
    raw = encode(document, ascii_only, bom)
    held = HeldJson(raw)
    # The trailing space ends a bare top-level number, which yajl holds back until it
    # knows the digits stopped (in the proxy the end of the body decides that case).
    scanner = scan(raw + b" ", cuts)
    for path in PATHS:
        whole = held(path)
        streamed = scanner.result(path)
        if streamed is not PENDING:
            # A dictionary has no repeated keys, so first occurrence and last agree.
            assert streamed == whole, (path, raw)
        elif not scanner.failed:
            # Only "absent" waits for the end; an id or an unreadable value is settled.
            assert whole is ABSENT, (path, raw, whole)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200), cuts=st.lists(st.integers(0, 300), max_size=6))
@example(raw=b'{"user": ' + b"9" * 5000 + b"}", cuts=[])  # ijson: SystemError, half-built
@example(raw=b'{"user": "\\udc00"}', cuts=[12])  # ijson: UnicodeDecodeError
@example(raw=b"\xef\xbb", cuts=[1])  # half a BOM
def test_any_bytes_only_settle_or_wait(raw: bytes, cuts: list[int]) -> None:
    scanner = scan(raw, cuts)
    for path in PATHS:
        assert isinstance(scanner.result(path), Found | Unreadable) or (
            scanner.result(path) is PENDING
        )


@settings(max_examples=200, deadline=None)
@given(
    prefix=DOCUMENTS,
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
    tail=st.binary(max_size=50),
)
def test_an_id_is_settled_before_the_body_ends(
    prefix: object, cuts: list[int], tail: bytes
) -> None:
    # The id comes first and the rest is anything, even truncated: the scan needs only
    # the bytes up to the id, so the rest can stream straight through.
    head = b'{"metadata": {"session_id": "s-1"}, "rest": '
    raw = head + json.dumps(prefix).encode() + tail
    scanner = scan(raw[: len(head)], cuts, ("metadata.session_id",))
    assert scanner.result("metadata.session_id") == Found("s-1")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"metadata": "x", "user": 5}', Unreadable("metadata is a string, not an object")),
        (b'[{"metadata": {}}', Unreadable("the body is an array, not an object")),
        (b'{"metadata": {"session_id": {"id": 1', Unreadable(
            "metadata.session_id is an object, not a string or an integer")),
        (b'{"metadata": {"session_id": 12', PENDING),  # the number may go on
        (b'{"metadata": {"session_id": 12,', Found("12")),
        (b'{"metadata": {"session_id": null}, "metadata": {"session_id": "b"', Found("b")),
    ],
)
def test_what_a_prefix_settles(raw: bytes, expected: object) -> None:
    assert scan(raw, []).result("metadata.session_id") == expected


@pytest.mark.parametrize(
    "raw",
    [
        b'{"temperature": NaN, "metadata": {"session_id": "s-1"}}',
        '{"metadata": {"session_id": "s-1"}}'.encode("utf-16"),
    ],
)
def test_what_yajl_refuses_is_left_to_the_whole_body(raw: bytes) -> None:
    scanner = scan(raw, [])
    assert scanner.failed
    assert scanner.result("metadata.session_id") is PENDING
    assert HeldJson(raw)("metadata.session_id") == Found("s-1")


def test_a_lone_surrogate_elsewhere_in_the_body_does_not_matter() -> None:
    raw = b'{"content": "\\ud800", "metadata": {"session_id": "s-1"}}'
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    assert scan(raw, [5]).result("metadata.session_id") == Found("s-1")


def test_a_bom_is_skipped_even_when_split() -> None:
    raw = b'\xef\xbb\xbf{"user": "u-1", "x": 1}'
    assert scan(raw, [1, 2, 3]).result("user") == Found("u-1")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)


def test_a_lone_surrogate_in_the_id_is_never_read_as_a_question_mark() -> None:
    # yajl turns "\ud800" into "?"; a pinned "?" would merge unrelated sessions.
    scanner = scan(b'{"user": "a\\ud800", "x": 1}', [])
    assert scanner.result("user") is PENDING
    assert scanner.failed
    assert scan(b'{"user": "a?", "x": 1}', []).failed  # a real "?" is re-read too


@pytest.mark.parametrize(
    ("has_body", "content_type", "encoding", "kind"),
    [
        (False, "application/json", None, BodyKind.NONE),
        (True, None, None, BodyKind.JSON),
        (True, "", None, BodyKind.JSON),
        (True, "application/json", None, BodyKind.JSON),
        (True, "Application/JSON; charset=utf-8", None, BodyKind.JSON),
        (True, "application/vnd.api+json", None, BodyKind.JSON),
        (True, "text/plain", None, BodyKind.NOT_JSON),
        (True, "multipart/form-data; boundary=x", None, BodyKind.NOT_JSON),
        (True, "application/x-www-form-urlencoded", None, BodyKind.NOT_JSON),
        (True, "application/json", "gzip", BodyKind.ENCODED),
        (True, "application/json", "identity", BodyKind.JSON),
    ],
)
def test_which_bodies_are_read_as_json(
    has_body: bool, content_type: str | None, encoding: str | None, kind: BodyKind
) -> None:
    assert body_kind(has_body, content_type, encoding) is kind
