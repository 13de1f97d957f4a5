"""Header rewriting between client and backend, request ids and W3C trace context (pure)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDict

if TYPE_CHECKING:
    import random
    from collections.abc import Mapping

    from proxy.core.forwarded import Forwarding

# RFC 9110 §7.6.1 names Connection, Proxy-Connection, Keep-Alive, TE, Transfer-Encoding
# and Upgrade, plus whatever a Connection header lists. Proxy-Authenticate and
# Proxy-Authorization come from RFC 2616 §13.5.1's older list: they are addressed to
# this proxy, and forwarding them would hand a client's proxy credentials upstream.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        # Not hop-by-hop in RFC 9110, but neither client announces trailers it will
        # send: trailers are not forwarded (aiohttp and llhttp drop them), so passing
        # on the announcement would promise fields that never come.
        "trailer",
    }
)

# The headers that tell a backend who the client is: believed only as forwarding.py
# says, and always rewritten (Forwarded is dropped, never generated).
FORWARDING: Final = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip", "forwarded"}
)

# Set by the proxy itself on the way up; a client-sent X-Pinned-Version is dropped so
# a client cannot choose what the backend checks its runtime against.
_REPLACED_UPSTREAM: Final = FORWARDING | frozenset(
    {"host", "content-length", "x-pinned-version", "x-request-id", "traceparent"}
)

# Set by the proxy itself on the way down, from the pin rather than from the backend.
_REPLACED_DOWNSTREAM: Final = frozenset(
    {"x-prompt-version", "x-prompt-version-changed", "x-served-by", "x-served-region"}
)

_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:/+=-]{1,200}")

# W3C Trace Context Level 1 §3.2: version, trace-id, parent-id, flags, all lowercase hex.
# A future version may append fields after the flags, separated by "-".
_TRACEPARENT: Final = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<parent>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})(?P<rest>-.*)?",
    re.DOTALL,
)
_ZERO_TRACE: Final = "0" * 32
_ZERO_PARENT: Final = "0" * 16


# Everything dropped on each way, before whatever a Connection header names.
_UPSTREAM_DROP: Final = HOP_BY_HOP | _REPLACED_UPSTREAM
_DOWNSTREAM_DROP: Final = HOP_BY_HOP | _REPLACED_DOWNSTREAM


def _scan(
    headers: Mapping[str, str], drop: frozenset[str]
) -> tuple[CIMultiDict[str], list[str]]:
    """The headers minus ``drop`` and whatever Connection lists, and the values of the
    dropped ``traceparent`` headers.

    One pass that lowers each name once and keeps what is not in ``drop``; only a
    message whose Connection header lists names (rare: HTTP/1.1 keep-alive needs none)
    is filtered again, since a Connection header may come after the headers it names.
    This runs twice per proxied request. items() (not get) so a multidict yields every
    duplicate; comparing lowered names keeps this right for a plain dict too.
    """
    kept: list[tuple[str, str]] = []
    traceparents: list[str] = []
    connection: list[str] = []
    for name, value in headers.items():
        lowered = name.lower()
        if lowered not in drop:
            kept.append((name, value))
        elif lowered == "connection":
            connection.append(value)
        elif lowered == "traceparent":
            traceparents.append(value)
    # "Connection: keep-alive" names only what is dropped anyway: no second pass.
    listed = _listed(connection) - drop if connection else None
    if listed:
        kept = [(name, value) for name, value in kept if name.lower() not in listed]
    return CIMultiDict(kept), traceparents


def _listed(connection_values: list[str]) -> set[str]:
    """The (lowered) names Connection headers list: hop-by-hop for this message."""
    return {
        token
        for value in connection_values
        for raw in value.split(",")
        if (token := raw.strip().lower())
    }


def forwarding_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """(lowered name, value) of the forwarding headers received, in order, minus any a
    Connection header names: those were for the hop that sent them, not for us."""
    items = [(name.lower(), value) for name, value in headers.items()]
    listed = _listed([value for low, value in items if low == "connection"])
    return [(low, value) for low, value in items if low in FORWARDING and low not in listed]


def upstream_request_headers(
    client: Mapping[str, str],
    *,
    forwarding: Forwarding,
    request_id: str,
    traceparent: str,
    pinned_version: str | None,
) -> CIMultiDict[str]:
    """The headers to send upstream for a client request with headers ``client``.

    Hop-by-hop headers (and those named by Connection, Trailer too), Host,
    Content-Length and any client-sent X-Pinned-Version are dropped; the forwarding
    headers (``FORWARDING``) are replaced by what ``forwarding`` says (forwarded.py);
    X-Request-ID and traceparent are replaced.
    ``tracestate`` is passed on while ``traceparent`` continues the client's trace (same
    trace id); when the trace was restarted it describes a trace that no longer applies
    and is dropped, as W3C Trace Context's processing model says.
    """
    out, incoming = _scan(client, _UPSTREAM_DROP)
    if forwarding.chain is not None:
        out["X-Forwarded-For"] = forwarding.chain
    if forwarding.client is not None:
        out["X-Real-IP"] = forwarding.client
    out["X-Forwarded-Proto"] = forwarding.proto
    if forwarding.host is not None:
        out["X-Forwarded-Host"] = forwarding.host
    out["X-Request-ID"] = request_id
    parent = parse_traceparent(incoming[0]) if len(incoming) == 1 else None
    if parent is None:
        out.popall("tracestate", None)
    else:
        ours = parse_traceparent(traceparent)
        if ours is None or parent[0] != ours[0]:
            out.popall("tracestate", None)
    out["traceparent"] = traceparent
    if pinned_version is not None:
        out["X-Pinned-Version"] = pinned_version
    return out


def client_response_headers(upstream: Mapping[str, str]) -> CIMultiDict[str]:
    """The backend's response headers minus hop-by-hop ones and those the proxy sets.

    Content-Length and Content-Encoding stay: the body is relayed byte for byte.
    """
    return _scan(upstream, _DOWNSTREAM_DROP)[0]


def valid_request_id(value: str | None) -> bool:
    """Whether a client-sent X-Request-ID may be passed on (1-200 safe characters)."""
    return value is not None and _REQUEST_ID.fullmatch(value) is not None


def new_request_id(rng: random.Random) -> str:
    """A fresh request id: 32 lowercase hex digits."""
    return f"{rng.getrandbits(128):032x}"


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """``(trace_id, parent_id, flags)`` of a valid W3C traceparent, else None.

    Version ``ff`` is invalid; version ``00`` must be exactly 55 characters; a higher
    version is parsed by its version-00 prefix and may carry more "-"-separated data.
    """
    if value is None:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace, parent, flags, rest = match.group("version", "trace", "parent", "flags", "rest")
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace == _ZERO_TRACE or parent == _ZERO_PARENT:
        return None
    return trace, parent, flags


def ensure_traceparent(value: str | None, rng: random.Random) -> str:
    """``value`` if it is a valid traceparent, else a new one from ``rng``.

    What the data plane sends while tracing is off (with tracing on, proxy/telemetry/tracing.py
    decides). A new trace gets flags ``00`` (not sampled): the proxy records no span for
    it, and marking every trace it invents as sampled would make backends' parent-based
    samplers record every request that arrived without trace context.
    """
    if parse_traceparent(value) is not None:
        assert value is not None
        return value
    trace = 0
    while trace == 0:
        trace = rng.getrandbits(128)
    parent = 0
    while parent == 0:
        parent = rng.getrandbits(64)
    return f"00-{trace:032x}-{parent:016x}-00"
