"""Header filtering, fuzzed: whatever a client or a backend sends, hop-by-hop headers and
those a Connection header names never cross the proxy, the proxy's own headers are its
own, and every other header passes untouched, in order."""

from __future__ import annotations

import random
import re

from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.core.forwarded import Forwarding
from proxy.core.headers import (
    FORWARDING,
    HOP_BY_HOP,
    client_response_headers,
    ensure_traceparent,
    parse_traceparent,
    upstream_request_headers,
    valid_request_id,
)

NAMES = st.sampled_from([
    "Connection", "connection", "Keep-Alive", "TE", "Transfer-Encoding", "Upgrade",
    "Proxy-Authorization", "Proxy-Connection", "Host", "Content-Length", "X-Pinned-Version",
    "X-Request-ID", "traceparent", "tracestate", "X-Prompt-Version", "X-Served-By",
    "X-Custom", "x-custom", "Authorization", "Accept", "X-Other", "Cookie",
    "X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP", "Forwarded", "Trailer",
])
OTHER_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10)
TOKENS = st.lists(st.one_of(NAMES, OTHER_NAMES).map(str.lower), max_size=3)
VALUES = st.text(alphabet="abc XYZ,;=-0123456789", max_size=20)


@st.composite
def header_lists(draw: st.DrawFn) -> CIMultiDict[str]:
    items = draw(st.lists(st.tuples(st.one_of(NAMES, OTHER_NAMES), VALUES), max_size=10))
    for _ in range(draw(st.integers(0, 2))):  # Connection headers listing some names
        tokens = draw(TOKENS)
        items.insert(draw(st.integers(0, len(items))), ("Connection", ", ".join(tokens)))
    return CIMultiDict(items)


def _listed(headers: CIMultiDict[str]) -> set[str]:
    return {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }


OURS_UPSTREAM = {"x-forwarded-proto", "x-request-id", "traceparent", "x-pinned-version"}


@settings(max_examples=300, deadline=None)
@given(
    client=header_lists(),
    pinned=st.one_of(st.none(), st.sampled_from(["prompt=v1", "prompt=v2,parser=p"])),
    trace_seed=st.integers(0, 2**32),
)
@example(client=CIMultiDict([("Connection", "x-custom"), ("X-Custom", "secret")]),
         pinned=None, trace_seed=0)
@example(client=CIMultiDict([("X-Custom", "a"), ("Connection", "X-CUSTOM , ,")]),
         pinned=None, trace_seed=0)
def test_upstream_headers_drop_hop_by_hop_and_keep_the_rest_in_order(
    client: CIMultiDict[str], pinned: str | None, trace_seed: int
) -> None:
    traceparent = ensure_traceparent(None, random.Random(trace_seed))
    out = upstream_request_headers(
        client, forwarding=Forwarding("10.0.0.1", "10.0.0.1", "http", None), request_id="req-1",
        traceparent=traceparent, pinned_version=pinned,
    )
    names = {name.lower() for name in out}
    listed = _listed(client)
    assert not names & HOP_BY_HOP
    # The forwarding headers are the edge's to rewrite (issue 9, section 4); the
    # proxy's own headers are set from its values, whatever the client listed.
    assert not (names & listed) - OURS_UPSTREAM - {"x-forwarded-for", "x-real-ip"}
    assert out.getall("X-Request-ID") == ["req-1"]
    assert out.getall("traceparent") == [traceparent]
    assert out.getall("X-Forwarded-Proto") == ["http"]
    assert out.getall("X-Pinned-Version", []) == ([pinned] if pinned else [])
    assert out.getall("X-Forwarded-For") == ["10.0.0.1"]
    assert out.getall("X-Real-IP") == ["10.0.0.1"]
    assert not names & {"forwarded", "x-forwarded-host", "trailer"}
    assert "host" not in names
    assert "content-length" not in names
    dropped = HOP_BY_HOP | listed | OURS_UPSTREAM | FORWARDING | {
        "host", "content-length", "tracestate"}
    kept = [(n.lower(), v) for n, v in client.items() if n.lower() not in dropped]
    assert [(n.lower(), v) for n, v in out.items() if n.lower() not in dropped] == kept


@settings(max_examples=300, deadline=None)
@given(upstream=header_lists())
def test_client_response_headers_drop_hop_by_hop_and_the_proxys_own(
    upstream: CIMultiDict[str],
) -> None:
    out = client_response_headers(upstream)
    own = {"x-prompt-version", "x-prompt-version-changed", "x-served-by", "x-served-region"}
    dropped = HOP_BY_HOP | own | _listed(upstream)
    assert not {name.lower() for name in out} & dropped
    kept = [(n.lower(), v) for n, v in upstream.items() if n.lower() not in dropped]
    assert [(n.lower(), v) for n, v in out.items()] == kept


TRACE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(
        st.none(),
        st.text(max_size=70),
        st.from_regex(r"[0-9a-fA-F]{2}-[0-9a-fA-F]{32}-[0-9a-fA-F]{16}-[0-9a-f]{2}(-.*)?",
                      fullmatch=True),
    ),
    seed=st.integers(0, 2**32),
)
@example(value="00-" + "0" * 32 + "-" + "1" * 16 + "-01", seed=0)  # all-zero trace id
@example(value="ff-" + "1" * 32 + "-" + "1" * 16 + "-01", seed=0)  # version ff
@example(value="00-" + "a" * 32 + "-" + "b" * 16 + "-01-more", seed=0)  # 00 has no tail
@example(value="00-" + "A" * 32 + "-" + "b" * 16 + "-01", seed=0)  # uppercase
def test_traceparent_parsing_accepts_only_valid_contexts(value: str | None, seed: int) -> None:
    parsed = parse_traceparent(value)
    if parsed is not None:
        assert value is not None
        trace, parent, flags = parsed
        assert TRACE.fullmatch(value[:55])
        assert trace != "0" * 32
        assert parent != "0" * 16
        assert (trace, parent, flags) == (value[3:35], value[36:52], value[53:55])
    out = ensure_traceparent(value, random.Random(seed))
    assert parse_traceparent(out) is not None
    assert out == value if parsed is not None else out.startswith("00-")


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.none(), st.text(max_size=210)))
@example(value="a\r\nX-Injected: 1")
@example(value="a" * 201)
def test_a_passed_on_request_id_is_short_and_safe(value: str | None) -> None:
    if valid_request_id(value):
        assert value is not None
        assert 1 <= len(value) <= 200
        assert re.fullmatch(r"[A-Za-z0-9._:/+=-]+", value)
