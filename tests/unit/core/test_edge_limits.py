"""The edge's pure decisions: connection caps, rate-limited warnings, request refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.edge_limits import (
    MALFORMED_DESCRIPTIONS,
    ConnectionAdmission,
    WarningLimiter,
    malformed_error,
    malformed_reason,
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
