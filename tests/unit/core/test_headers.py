"""Header rewriting, request ids and W3C trace context."""

from __future__ import annotations

import random

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.core.forwarded import Forwarding
from proxy.core.headers import (
    client_response_headers,
    ensure_traceparent,
    forwarding_headers,
    new_request_id,
    parse_traceparent,
    upstream_request_headers,
    valid_request_id,
)

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def multi(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def upstream(client: CIMultiDictProxy[str], **kw: object) -> CIMultiDict[str]:
    args: dict[str, object] = {
        "forwarding": Forwarding("203.0.113.7", "203.0.113.7", "https", None),
        "request_id": "req-1",
        "traceparent": TP,
        "pinned_version": None,
    }
    args.update(kw)
    return upstream_request_headers(client, **args)  # type: ignore[arg-type]


# --- upstream request headers -----------------------------------------------------------


def test_hop_by_hop_headers_are_dropped() -> None:
    client = multi(
        ("Connection", "keep-alive"),
        ("Proxy-Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Accept", "application/json"),
    )
    out = upstream(client)
    for name in (
        "Connection",
        "Proxy-Connection",
        "Keep-Alive",
        "TE",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Authorization",
    ):
        assert name not in out
    assert out["Accept"] == "application/json"


def test_headers_named_by_connection_are_dropped_case_insensitively() -> None:
    client = multi(
        ("Connection", "close, X-Secret-Hop"),
        ("connection", " x-other ,, "),
        ("x-secret-hop", "1"),
        ("X-OTHER", "2"),
        ("X-Kept", "3"),
    )
    out = upstream(client)
    assert "X-Secret-Hop" not in out
    assert "X-Other" not in out
    assert out["X-Kept"] == "3"


def test_host_content_length_and_client_pin_are_dropped() -> None:
    client = multi(
        ("Host", "proxy.example"),
        ("Content-Length", "12"),
        ("X-Pinned-Version", "prompt=evil"),
        ("Content-Type", "application/json"),
    )
    out = upstream(client)
    assert "Host" not in out
    assert "Content-Length" not in out
    assert "X-Pinned-Version" not in out
    assert out["Content-Type"] == "application/json"
    pinned = upstream(client, pinned_version="prompt=v1")
    assert pinned.getall("X-Pinned-Version") == ["prompt=v1"]


FORGED = (
    ("X-Forwarded-For", "6.6.6.6"), ("x-forwarded-for", "7.7.7.7"),
    ("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "https"),
    ("X-Real-IP", "6.6.6.6"), ("Forwarded", "for=6.6.6.6;proto=https"),
)


def test_forwarding_headers_are_replaced_by_what_the_resolution_says() -> None:
    out = upstream(multi(*FORGED), forwarding=Forwarding("127.0.0.1", "127.0.0.1", "http", None))
    assert out.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert out.getall("X-Real-IP") == ["127.0.0.1"]
    assert out.getall("X-Forwarded-Proto") == ["http"]
    assert "X-Forwarded-Host" not in out
    assert "Forwarded" not in out
    vouched = Forwarding("198.51.100.1", "198.51.100.1, 10.0.0.2", "https", "api.example")
    out = upstream(multi(*FORGED), forwarding=vouched)
    assert out.getall("X-Forwarded-For") == ["198.51.100.1, 10.0.0.2"]
    assert out.getall("X-Real-IP") == ["198.51.100.1"]
    assert out.getall("X-Forwarded-Host") == ["api.example"]
    assert "Forwarded" not in out
    # No IP peer (a Unix socket): nothing claimed.
    out = upstream(multi(*FORGED), forwarding=Forwarding(None, None, "http", None))
    assert "X-Forwarded-For" not in out
    assert "X-Real-IP" not in out


def test_forwarding_headers_named_in_connection_are_not_read() -> None:
    got = forwarding_headers(multi(
        ("Connection", "X-Forwarded-For"), ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"), ("Accept", "*/*"),
    ))
    assert got == [("x-forwarded-proto", "https")]


def test_trailer_is_not_forwarded_either_way() -> None:
    assert "Trailer" not in upstream(multi(("Trailer", "X-Checksum"), ("TE", "trailers")))
    assert "Trailer" not in client_response_headers(multi(("Trailer", "X-Checksum")))


def test_proxy_headers_replace_client_ones() -> None:
    client = multi(
        ("X-Forwarded-Proto", "gopher"),
        ("X-Request-ID", "client-chosen"),
        ("traceparent", "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-01"),
        ("tracestate", "vendor=1"),
    )
    out = upstream(client, forwarding=Forwarding("192.0.2.1", "192.0.2.1", "http", None),
                   request_id="rid-9")
    assert out.getall("X-Forwarded-Proto") == ["http"]
    assert out.getall("X-Request-ID") == ["rid-9"]
    assert out.getall("traceparent") == [TP]


def test_tracestate_kept_with_its_traceparent_and_dropped_when_the_trace_restarts() -> None:
    kept = upstream(multi(("traceparent", TP), ("tracestate", "a=1"), ("tracestate", "b=2")))
    assert kept.getall("tracestate") == ["a=1", "b=2"]
    restarted = upstream(multi(("traceparent", "garbage"), ("tracestate", "a=1")))
    assert "tracestate" not in restarted
    assert "tracestate" not in upstream(multi(("tracestate", "a=1")))
    # A child span of the same trace (new parent id) keeps the client's tracestate.
    child = TP[:36] + "1111111111111111-01"
    assert (
        upstream(multi(("traceparent", TP), ("tracestate", "a=1")), traceparent=child)["tracestate"]
        == "a=1"
    )


def test_duplicates_and_order_are_preserved() -> None:
    client = multi(
        ("Accept", "a"),
        ("X-Multi", "1"),
        ("Authorization", "Bearer t"),
        ("x-multi", "2"),
        ("Cookie", "a=1"),
    )
    out = upstream(client)
    assert list(out.items())[:5] == [
        ("Accept", "a"),
        ("X-Multi", "1"),
        ("Authorization", "Bearer t"),
        ("x-multi", "2"),
        ("Cookie", "a=1"),
    ]
    assert out.getall("X-Multi") == ["1", "2"]


def test_input_is_not_mutated() -> None:
    raw = CIMultiDict([("Connection", "close"), ("Host", "h")])
    upstream(CIMultiDictProxy(raw))
    assert list(raw.items()) == [("Connection", "close"), ("Host", "h")]


# --- client response headers ------------------------------------------------------------


def test_response_drops_hop_by_hop_and_proxy_owned_headers() -> None:
    up = multi(
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Proxy-Authenticate", "Basic"),
        ("X-Prompt-Version", "v9"),
        ("X-Prompt-Version-Changed", "1"),
        ("X-Served-By", "b9"),
        ("X-Served-Region", "r9"),
        ("Content-Length", "10"),
        ("Content-Encoding", "gzip"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Parser-Version", "p1"),
    )
    out = client_response_headers(up)
    assert list(out.items()) == [
        ("Content-Length", "10"),
        ("Content-Encoding", "gzip"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Parser-Version", "p1"),
    ]


def test_plain_dict_input_works_too() -> None:
    out = client_response_headers({"connection": "x-a", "X-A": "1", "Server": "s"})
    assert list(out.items()) == [("Server", "s")]


# --- request ids ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["a", "0af7651916cd43dd", "req-1.2_3:4/5+6=7", "A" * 200, "x=y==", "-"]
)
def test_valid_request_ids(value: str) -> None:
    assert valid_request_id(value)


@pytest.mark.parametrize(
    "value", [None, "", "A" * 201, "has space", "new\nline", "tab\t", 'quote"', "é", "a,b", "a;b"]
)
def test_invalid_request_ids(value: str | None) -> None:
    assert not valid_request_id(value)


def test_trailing_newline_is_not_valid() -> None:
    assert not valid_request_id("abc\n")


def test_new_request_id_is_valid_and_deterministic() -> None:
    a = new_request_id(random.Random(7))
    assert a == new_request_id(random.Random(7))
    assert len(a) == 32
    assert valid_request_id(a)
    assert a != new_request_id(random.Random(8))


# --- W3C trace context ------------------------------------------------------------------


def test_parse_valid_version_00() -> None:
    assert parse_traceparent(TP) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "01")
    other_flags = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-09"
    assert parse_traceparent(other_flags) == (
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
        "09",
    )


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "00",
        # version ff is forbidden
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        # uppercase hex anywhere
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-B7AD6B7169203331-01",
        "0A-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0A",
        # all-zero ids
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        # wrong lengths
        "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
        # version 00 must be exactly 55 characters
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
        # wrong separators, non-hex, whitespace
        "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
        " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n",
        # a future version still needs "-" or the end after the flags
        "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01.what",
        "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-012",
    ],
)
def test_parse_invalid(value: str | None) -> None:
    assert parse_traceparent(value) is None


def test_parse_future_versions_by_their_prefix() -> None:
    longer = "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future-holds"
    assert parse_traceparent(longer) == (
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
        "01",
    )
    same_length = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    assert parse_traceparent(same_length) is not None
    assert parse_traceparent("fe" + TP[2:]) is not None


def test_ensure_passes_a_valid_value_unchanged() -> None:
    rng = random.Random(1)
    assert ensure_traceparent(TP, rng) == TP
    future = "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x"
    assert ensure_traceparent(future, rng) == future


@pytest.mark.parametrize(
    "value", [None, "", "garbage", "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]
)
def test_ensure_creates_a_fresh_unsampled_trace(value: str | None) -> None:
    made = ensure_traceparent(value, random.Random(42))
    parsed = parse_traceparent(made)
    assert parsed is not None
    assert made.startswith("00-")
    assert len(made) == 55
    assert parsed[2] == "00"
    assert made == ensure_traceparent(value, random.Random(42))
    assert made != ensure_traceparent(value, random.Random(43))


class ZeroFirst(random.Random):
    """An rng whose first draws are zero, to prove all-zero ids are never produced."""

    def __init__(self) -> None:
        super().__init__(0)
        self.zeros = 2

    def getrandbits(self, k: int) -> int:
        if self.zeros:
            self.zeros -= 1
            return 0
        return super().getrandbits(k)


def test_ensure_never_makes_all_zero_ids() -> None:
    made = ensure_traceparent(None, ZeroFirst())
    assert parse_traceparent(made) is not None
