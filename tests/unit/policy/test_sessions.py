"""Session-id extraction: source order, the three kinds of source, and validation."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config.settings import SessionSource
from proxy.core.errors import BadRequest
from proxy.policy.sessions import extract_session_id

HEADER = SessionSource(kind="header", name="X-Session-ID")
COOKIE = SessionSource(kind="cookie", name="sid")
BODY = SessionSource(kind="body", name="metadata.session_id")


def headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


NO_HEADERS = headers()


def body(doc: object) -> bytes:
    return orjson.dumps(doc)


def test_first_source_in_order_wins() -> None:
    h = headers(X_Session_ID="from-header")
    b = body({"metadata": {"session_id": "from-body"}})
    c = {"sid": "from-cookie"}
    assert extract_session_id([HEADER, BODY, COOKIE], h, c, b) == "from-header"
    assert extract_session_id([BODY, HEADER, COOKIE], h, c, b) == "from-body"
    assert extract_session_id([COOKIE, BODY, HEADER], h, c, b) == "from-cookie"


def test_falls_through_missing_and_empty_sources() -> None:
    h = headers(X_Session_ID="")
    b = body({"metadata": {"session_id": "from-body"}})
    assert extract_session_id([HEADER, COOKIE, BODY], h, {"sid": ""}, b) == "from-body"
    assert extract_session_id([HEADER, COOKIE], NO_HEADERS, {}, None) is None


def test_header_lookup_is_case_insensitive() -> None:
    h = headers(x_session_id="abc")
    assert extract_session_id([HEADER], h, {}, None) == "abc"
    lower = SessionSource(kind="header", name="x-session-id")
    assert extract_session_id([lower], headers(X_SESSION_ID="abc"), {}, None) == "abc"


def test_cookie_source() -> None:
    assert extract_session_id([COOKIE], NO_HEADERS, {"sid": "c-1", "other": "x"}, None) == "c-1"
    assert extract_session_id([COOKIE], NO_HEADERS, {"other": "x"}, None) is None


def test_dotted_body_path() -> None:
    deep = SessionSource(kind="body", name="a.b.c")
    assert extract_session_id([deep], NO_HEADERS, {}, body({"a": {"b": {"c": "x"}}})) == "x"
    top = SessionSource(kind="body", name="user")
    assert extract_session_id([top], NO_HEADERS, {}, body({"user": "u-9"})) == "u-9"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"null",
        b'{"metadata": {}}',
        b'{"metadata": null}',
        b'{"metadata": {"session_id": null}}',
        b'{"metadata": {"session_id": ""}}',
        b'{"other": {"session_id": "x"}}',
    ],
)
def test_a_readable_body_without_the_field_has_no_id(raw: bytes) -> None:
    assert extract_session_id([BODY], NO_HEADERS, {}, raw) is None


# These were "no id" before issue 9: each routed the request unpinned, silently losing
# the session of a client that meant to send one (a double-encoded "metadata", say).
@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "the body is not JSON"),
        (b'{"metadata": {"session_id": "x"}', "the body is not JSON"),  # truncated
        (b'["metadata"]', "the body is an array, not an object"),
        (b'"metadata"', "the body is a string, not an object"),
        (b'{"metadata": "session_id"}', "metadata is a string, not an object"),
        (b'{"metadata": ["session_id"]}', "metadata is an array, not an object"),
        (b'{"metadata": "{\\"session_id\\": \\"x\\"}"}', "metadata is a string, not an object"),
    ],
)
def test_a_body_source_that_cannot_be_read_is_refused_as_unreadable(
    raw: bytes, reason: str
) -> None:
    with pytest.raises(BadRequest) as info:
        extract_session_id([BODY, COOKIE], NO_HEADERS, {"sid": "c"}, raw)
    assert (info.value.status, info.value.code) == (400, "unreadable_session_id")
    assert info.value.param == "metadata.session_id"
    assert info.value.message == (
        f"session id from body field metadata.session_id cannot be read: {reason}"
    )


def test_no_body_skips_body_sources() -> None:
    assert extract_session_id([BODY, COOKIE], NO_HEADERS, {"sid": "c"}, None) == "c"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(42, "42"), (0, "0"), (-7, "-7"), (None, None), ("", None), ("s-1", "s-1")],
)
def test_body_value_types(value: object, expected: str | None) -> None:
    raw = body({"metadata": {"session_id": value}})
    assert extract_session_id([BODY], NO_HEADERS, {}, raw) == expected


@pytest.mark.parametrize(
    ("value", "what"),
    [
        (True, "a boolean"),
        (False, "a boolean"),
        (1.5, "a number that is not an integer"),
        ({"id": "x"}, "an object"),
        (["x"], "an array"),
    ],
)
def test_a_body_value_that_is_no_id_is_refused_not_skipped(value: object, what: str) -> None:
    # Before issue 9 these fell through to the next source (or to no pin at all).
    raw = body({"metadata": {"session_id": value}})
    with pytest.raises(BadRequest) as info:
        extract_session_id([BODY, COOKIE], NO_HEADERS, {"sid": "c"}, raw)
    assert info.value.code == "unreadable_session_id"
    assert info.value.message.endswith(
        f"metadata.session_id is {what}, not a string or an integer"
    )


def test_an_absent_body_field_falls_through_to_the_next_source() -> None:
    raw = body({"metadata": {"session_id": None}})
    assert extract_session_id([BODY, COOKIE], NO_HEADERS, {"sid": "c"}, raw) == "c"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"temperature": NaN, "metadata": {"session_id": "s-1"}}',
        b'{"a": [Infinity, -Infinity], "metadata": {"session_id": "s-1"}}',
        b'\xef\xbb\xbf{"metadata": {"session_id": "s-1"}}',
        b'{"content": "\\ud800", "metadata": {"session_id": "s-1"}}',
        b'{"content": "\\udc00 lone low", "metadata": {"session_id": "s-1"}}',
        '{"metadata": {"session_id": "s-1"}}'.encode("utf-16"),
    ],
)
def test_the_body_is_read_the_way_a_backend_reads_it(raw: bytes) -> None:
    # Each of these is refused by orjson and accepted by Python's json, as by a backend.
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    assert json.loads(raw)["metadata"]["session_id"] == "s-1"
    assert extract_session_id([BODY], NO_HEADERS, {}, raw) == "s-1"


def test_a_lone_surrogate_in_the_id_itself_is_an_invalid_id() -> None:
    raw = b'{"metadata": {"session_id": "a\\ud800"}}'
    with pytest.raises(BadRequest) as info:
        extract_session_id([BODY], NO_HEADERS, {}, raw)
    assert info.value.code == "invalid_session_id"


def test_an_integer_id_past_64_bits_is_read_exactly_as_a_backend_reads_it() -> None:
    # orjson reads it as a float (which is no id); Python's json, like a backend, exactly.
    raw = b'{"metadata": {"session_id": 123456789012345678901234567890}}'
    assert isinstance(orjson.loads(raw)["metadata"]["session_id"], float)
    assert extract_session_id([BODY], NO_HEADERS, {}, raw) == "123456789012345678901234567890"
    with pytest.raises(BadRequest, match="not an integer"):
        extract_session_id([BODY], NO_HEADERS, {}, raw.replace(b"}}", b".5}}"))


def test_an_integer_id_too_long_for_python_is_unreadable() -> None:
    raw = b'{"metadata": {"session_id": ' + b"9" * 5000 + b"}}"
    with pytest.raises(BadRequest) as info:
        extract_session_id([BODY], NO_HEADERS, {}, raw)
    assert info.value.code == "unreadable_session_id"


def test_body_is_parsed_only_when_a_body_source_is_reached() -> None:
    # Invalid JSON behind a header that already answered is never looked at.
    h = headers(X_Session_ID="h")
    assert extract_session_id([HEADER, BODY], h, {}, b"\xff not json") == "h"


def test_exactly_max_bytes_is_accepted() -> None:
    value = "a" * 256
    assert extract_session_id([HEADER], headers(X_Session_ID=value), {}, None) == value


def test_longer_than_max_bytes_is_rejected_naming_the_source() -> None:
    value = "a" * 257
    with pytest.raises(BadRequest) as info:
        extract_session_id([HEADER], headers(X_Session_ID=value), {}, None)
    err = info.value
    assert err.code == "invalid_session_id"
    assert err.status == 400
    assert err.message == "session id from header X-Session-ID is longer than 256 bytes"
    assert value not in err.message


def test_max_bytes_counts_utf8_bytes_not_characters() -> None:
    ok = "é" * 128  # 2 bytes each: 256
    assert extract_session_id([HEADER], headers(X_Session_ID=ok), {}, None) == ok
    with pytest.raises(BadRequest, match="longer than 256 bytes"):
        extract_session_id([HEADER], headers(X_Session_ID=ok + "a"), {}, None)
    with pytest.raises(BadRequest, match="longer than 10 bytes"):
        extract_session_id([COOKIE], NO_HEADERS, {"sid": "€€€€"}, None, max_bytes=10)


@pytest.mark.parametrize("char", ["\x00", "\x1f", "\t", "\n", "\x7f", "\x80", "\x85", "\x9f"])
def test_control_characters_are_rejected(char: str) -> None:
    raw = body({"metadata": {"session_id": f"abc{char}def"}})
    with pytest.raises(BadRequest) as info:
        extract_session_id([BODY], NO_HEADERS, {}, raw)
    assert info.value.code == "invalid_session_id"
    assert "body field metadata.session_id" in info.value.message
    assert "control character" in info.value.message
    assert f"U+{ord(char):04X}" in info.value.message
    assert "abc" not in info.value.message


def test_non_control_unicode_is_accepted() -> None:
    for value in ("\xa0nbsp", "é", "日本", "🙂", "a b"):
        assert extract_session_id([COOKIE], NO_HEADERS, {"sid": value}, None) == value


def test_invalid_id_is_an_error_even_if_a_later_source_is_valid() -> None:
    h = headers(X_Session_ID="ok")
    with pytest.raises(BadRequest, match="cookie sid"):
        extract_session_id([COOKIE, HEADER], h, {"sid": "bad\x01"}, None)


def test_lone_surrogate_is_rejected() -> None:
    with pytest.raises(BadRequest, match="not valid UTF-8"):
        extract_session_id([COOKIE], NO_HEADERS, {"sid": "a\udcff"}, None)


def is_control(c: str) -> bool:
    return ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F


@settings(max_examples=200, deadline=None)
@given(
    value=st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
    max_bytes=st.integers(1, 300),
)
def test_any_accepted_id_is_clean_and_short_enough(value: str, max_bytes: int) -> None:
    def extract() -> str | None:
        return extract_session_id([COOKIE], NO_HEADERS, {"sid": value}, None, max_bytes=max_bytes)

    if value and (len(value.encode()) > max_bytes or any(map(is_control, value))):
        with pytest.raises(BadRequest) as info:
            extract()
        assert info.value.code == "invalid_session_id"
        return
    got = extract()
    if not value:
        assert got is None
        return
    assert got == value
    assert len(got.encode("utf-8")) <= max_bytes
    assert not any(map(is_control, got))


def test_duplicate_session_headers_that_disagree_are_rejected() -> None:
    sources = [SessionSource(kind="header", name="X-Session-ID")]
    same = CIMultiDict([("X-Session-ID", "a"), ("x-session-id", "a")])
    assert extract_session_id(sources, same, {}, None) == "a"
    differing = CIMultiDict([("X-Session-ID", "a"), ("x-session-id", "b")])
    with pytest.raises(BadRequest) as info:
        extract_session_id(sources, differing, {}, None)
    assert info.value.code == "invalid_session_id"
    assert "more than once" in info.value.message


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=120), header=st.one_of(st.none(), st.text(max_size=20)))
@example(raw=b'{"metadata": {"session_id": ' + b"1" * 5000 + b"}}", header=None)
@example(raw=b'{"metadata": {"session_id": "\\ud800"}}', header=None)
@example(raw=b"\xef\xbb\xbf", header=None)
def test_any_body_gives_a_clean_id_none_or_a_stated_refusal(
    raw: bytes, header: str | None
) -> None:
    h = headers(X_Session_ID=header) if header is not None else NO_HEADERS
    refusal: BadRequest | None = None
    try:
        got = extract_session_id([HEADER, BODY], h, {}, raw)
    except BadRequest as exc:
        refusal = exc
    if refusal is not None:
        assert refusal.code in ("invalid_session_id", "unreadable_session_id")
        assert refusal.status == 400
        return
    if got is not None:
        assert 0 < len(got.encode("utf-8")) <= 256
        assert not any(map(is_control, got))
        if not header:
            # A body id is what Python's json, like a backend, reads at the path.
            value = json.loads(raw)["metadata"]["session_id"]
            assert got == (value if isinstance(value, str) else str(value))
