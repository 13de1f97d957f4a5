"""The edge's pure decisions: connection caps, rate-limited warnings, request refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.edge_limits import (
    MALFORMED_DESCRIPTIONS,
    ConnectionAdmission,
    WarningLimiter,
    declared_body_too_large,
    malformed_error,
    malformed_reason,
    method_refusal,
    request_head_size,
    target_refusal,
    unparsed_method_refusal,
)


def test_connections_are_capped_in_all_and_per_ip() -> None:
    admission = ConnectionAdmission(max_total=3, max_per_ip=2)
    assert admission.admit("10.0.0.1") is None
    assert admission.admit("10.0.0.1") is None
    assert admission.admit("10.0.0.1") == "max_connections_per_ip"
    assert admission.admit("10.0.0.2") is None
    assert admission.admit("10.0.0.3") == "max_connections"
    admission.release("10.0.0.1")
    assert admission.admit("10.0.0.3") is None
    assert admission.total == 3


def test_without_a_per_ip_cap_only_the_total_counts() -> None:
    admission = ConnectionAdmission(max_total=2, max_per_ip=0)
    assert admission.admit("10.0.0.1") is None
    assert admission.admit("10.0.0.1") is None
    assert admission.admit(None) == "max_connections"
    assert admission.open_from("10.0.0.1") == 0  # not tracked at all


@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["a", "b", "c", None]))))
def test_admitted_connections_never_exceed_the_caps_and_release_frees_them(
    ops: list[tuple[bool, str | None]],
) -> None:
    admission = ConnectionAdmission(max_total=4, max_per_ip=2)
    open_: list[str | None] = []
    for connect, ip in ops:
        if connect:
            if admission.admit(ip) is None:
                open_.append(ip)
        elif ip in open_:
            open_.remove(ip)
            admission.release(ip)
        assert admission.total == len(open_) <= 4
        for who in ("a", "b", "c"):
            assert admission.open_from(who) == open_.count(who) <= 2
    for ip in open_:
        admission.release(ip)
    assert admission.total == 0
    assert all(admission.open_from(who) == 0 for who in ("a", "b", "c"))


def test_one_warning_per_interval_and_the_count_of_those_held_back() -> None:
    now = [100.0]
    limiter = WarningLimiter(10.0, lambda: now[0])
    assert limiter.allow() == 0
    assert limiter.allow() is None
    now[0] = 105.0
    assert limiter.allow() is None
    now[0] = 110.0
    assert limiter.allow() == 2
    assert limiter.allow() is None


@pytest.mark.parametrize(("kinds", "message", "reason"), [
    (["BadHttpMethod", "BadStatusLine"], "Invalid method encountered", "method"),
    (["BadStatusLine", "BadHttpMessage"], "Bad status line: Invalid HTTP version", "request_line"),
    (["InvalidURLError", "BadHttpMessage"], "Invalid char in url path", "target"),
    (["LineTooLong", "BadHttpMessage"], "Got more than 8190 bytes", "head_too_large"),
    (["BadHttpMessage"], "Too many headers received", "head_too_large"),
    (["BadHttpMessage"], "Invalid header token", "header"),
    (["BadHttpMessage"], "Invalid header value char", "header"),
    (["BadHttpMessage"], "Invalid character in Content-Length", "content_length"),
    (["BadHttpMessage"], "Transfer-Encoding can't be present with Content-Length",
     "body_framing"),
    (["BadHttpMessage"], "Invalid character in chunk size", "body_framing"),
    (["BadHttpMessage"], "Something llhttp says one day", "other"),
    ([], "", "other"),
])
def test_parse_errors_get_a_bounded_reason(kinds: list[str], message: str, reason: str) -> None:
    assert malformed_reason(kinds, message, in_body=False) == reason
    # Whatever it says, an error while a body is being read is the body's framing.
    assert malformed_reason(kinds, message, in_body=True) == "body_framing"


@given(st.lists(st.text(max_size=20), max_size=4), st.text())
def test_a_malformed_answer_never_echoes_what_was_sent(kinds: list[str], message: str) -> None:
    reason = malformed_reason(kinds, message, in_body=False)
    error = malformed_error(reason)
    assert error.status in (400, 431)
    assert error.code in ("bad_http_request", "request_head_too_large")
    fixed = {f"malformed request: {text}" for text in MALFORMED_DESCRIPTIONS.values()}
    assert error.message in fixed  # one of the fixed texts, whatever was sent


@given(
    method=st.sampled_from(["GET", "POST", "PROPFIND"]),
    target=st.text(alphabet="abcdefghij/?=&%0123456789", min_size=1, max_size=50),
    headers=st.lists(st.tuples(st.text(alphabet="abcXYZ-", min_size=1, max_size=20),
                               st.text(alphabet="abc xyz;=,", max_size=80)), max_size=20),
)
def test_a_request_heads_size_is_counted_as_sent(
    method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    raw = f"{method} /{target} HTTP/1.1\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    raw_headers = [(n.encode(), v.encode()) for n, v in headers]
    assert request_head_size(method, "/" + target, raw_headers) == len(raw.encode())


def test_a_declared_body_is_over_the_limit_only_when_larger() -> None:
    assert declared_body_too_large("1001", 1000)
    assert not declared_body_too_large("1000", 1000)
    assert not declared_body_too_large(None, 1000)
    assert not declared_body_too_large("99999999999", 0)  # 0: no limit


def test_trace_and_track_are_refused_with_allow() -> None:
    for method in ("TRACE", "TRACK"):
        error = method_refusal(method)
        assert error is not None
        assert (error.status, error.code) == (405, "method_not_allowed")
        assert "GET" in error.headers["Allow"]
    assert method_refusal("GET") is None
    assert method_refusal("OPTIONS") is None
    track = unparsed_method_refusal(
        ["BadHttpMethod", "BadStatusLine"], "Invalid method encountered:\n\n  b'TRACK /x HTTP/1.1'")
    assert track is not None
    assert track.status == 405
    assert unparsed_method_refusal(["BadHttpMethod"], "  b'FOO /x HTTP/1.1'") is None
    assert unparsed_method_refusal(["BadStatusLine"], "  b'TRACK /x HTTP/1.1'") is None


@pytest.mark.parametrize(("target", "refused"), [
    ("/v1/x", False), ("*", False), ("host:443", False),  # not absolute form: decided elsewhere
    ("http://10.0.0.5:8080/v1/x", False), ("http://proxy.internal:8080/x", False),
    ("HTTP://[::1]:8080/x", False), ("http://10.0.0.5.:8080/x", False),
    ("http://10.0.0.5/x", True),  # port 80 is not ours
    ("https://10.0.0.5:8080/x", True), ("http://evil.example:8080/x", True),
    ("http://u@10.0.0.5:8080/x", True), ("http://10.0.0.5:99999/x", True),
    ("http://[::2]:8080/x", True), ("http://:8080/x", True),
])
def test_absolute_form_targets_are_refused_unless_they_name_the_proxy(
    target: str, refused: bool
) -> None:
    error = target_refusal(target, "http", ["10.0.0.5", "proxy.internal", "::1"], 8080)
    assert (error is not None) == refused
    if error is not None:
        assert (error.status, error.code) == (400, "invalid_request_target")
