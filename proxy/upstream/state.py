"""The upstream connection's states and the pool's decisions about it, as pure functions.

Every judgement the client makes about a connection (lend this idle one? put this one
back? write this request again on a fresh one? what does a lost connection mean for
the response in flight?) is made here, from plain values, so it is stated once and
tested exhaustively (tests/unit/upstream/test_state.py) apart from any socket.
``http1.Connection`` and ``pool.Http1Pool`` only gather the values and act.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Sequence

    from proxy.config.settings import UpstreamConfig

_STATUS_LINE_OVERHEAD: Final = len("HTTP/1.1 200 \r\n") + len("\r\n")


class ConnState(enum.Enum):
    """Where one connection is in its request/response exchange.

    Whether the connection is still open is a separate fact (``Connection.closed``): a
    response read to its end stays ``COMPLETE`` (and readable) after the backend closes.
    """

    IDLE = "idle"  # nothing in flight: in the pool, or just connected
    AWAITING_HEAD = "awaiting_head"  # a request written (its body may still stream up)
    READING_BODY = "reading_body"  # the final head is in; its body is arriving
    COMPLETE = "complete"  # the response was read to its end


class IdleVerdict(enum.Enum):
    """What the pool does with the oldest idle connection of an origin."""

    LEND = "lend"
    DISCARD = "discard"  # closed, or kept alive past the keep-alive period: closed
    TOO_YOUNG = "too_young"  # quiet for less than asked: neither it nor younger ones


class Lost(enum.Enum):
    """What a connection lost mid-exchange means for the response in flight."""

    NOTHING = "nothing"  # no exchange was in flight (or it had completed)
    COMPLETES = "completes"  # a body delimited by the end of the connection: it is whole
    DROPPED = "dropped"  # the request was written, no head came back
    BODY_BROKEN = "body_broken"  # the head was in, the body was cut off


def idle_verdict(*, usable: bool, age_s: float, keepalive_s: float, quiet_s: float) -> IdleVerdict:
    """May an idle connection quiet for ``age_s`` be lent, given the pool's periods?

    A connection is lent only after ``quiet_s`` without a byte (a backend's stray second
    response closes it while idle instead of answering the next request), and never past
    ``keepalive_s`` (the backend may be about to close it).
    """
    if not usable or age_s >= keepalive_s:
        return IdleVerdict.DISCARD
    if age_s < quiet_s:
        return IdleVerdict.TOO_YOUNG
    return IdleVerdict.LEND


def reusable(state: ConnState, *, keep_alive: bool, request_sent: bool, unread: bool) -> bool:
    """Whether a finished connection goes back to the pool rather than being closed.

    Only when its response was read to its end (``COMPLETE``), both sides allow
    keep-alive, the whole request body was written (a streamed body cut short leaves
    the backend waiting for the rest) and nothing unread is buffered: a connection never
    carries half an exchange into the next request. (A closed pool closes what it is
    given back: ``Http1Pool.put_idle``.)
    """
    return state is ConnState.COMPLETE and keep_alive and request_sent and not unread


def may_replay(*, replayable: bool, streamed: bool, reused: bool, got_bytes: bool) -> bool:
    """Whether a request that failed unanswered is written once more on a fresh connection.

    Only a ``replayable`` request (idempotent method or Idempotency-Key: the backend may
    have read it before closing, and a replayed completion is billed twice) whose body
    is held (a streamed one cannot be read again), that failed on a *reused* connection
    (which the backend most likely closed while idle) before any byte came back.
    """
    return replayable and not streamed and reused and not got_bytes


def lost(state: ConnState, *, until_eof: bool, clean: bool) -> Lost:
    """What the end of the connection means in ``state``.

    ``until_eof``: the response has neither a length nor chunked framing, so its body ends
    with the connection; ``clean``: the connection ended by an orderly close, not an error.
    """
    if state is ConnState.AWAITING_HEAD:
        return Lost.DROPPED
    if state is ConnState.READING_BODY:
        return Lost.COMPLETES if until_eof and clean else Lost.BODY_BROKEN
    return Lost.NOTHING


def keep_alive_of(http_version: str, connection: str | None) -> bool:
    """Whether a response's head allows another request on its connection (RFC 9112 §9.3).

    For the heads llhttp's own verdict does not fit (an answer to HEAD, whose framing
    headers describe a body that never comes): HTTP/1.1 stays open unless ``Connection``
    says ``close``; HTTP/1.0 only with ``keep-alive``.
    """
    tokens = {t.strip().lower() for t in connection.split(",")} if connection else set()
    if "close" in tokens:
        return False
    return http_version == "1.1" or "keep-alive" in tokens


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """How large a response head may be (``upstream.max_response_head_bytes`` and
    ``max_response_headers``)."""

    max_bytes: int = 64 * 1024
    max_headers: int = 100

    @classmethod
    def from_config(cls, config: UpstreamConfig) -> HeadLimits:
        return cls(config.max_response_head_bytes, config.max_response_headers)

    def exceeded(self, size: int, count: int) -> str | None:
        """What is wrong with a head of ``size`` bytes and ``count`` headers, if anything."""
        if size > self.max_bytes:
            return f"the backend's response head is larger than {self.max_bytes} bytes"
        if count > self.max_headers:
            return f"the backend's response has more than {self.max_headers} headers"
        return None


DEFAULT_HEAD_LIMITS: Final = HeadLimits()


def response_head_size(reason_bytes: int, raw_headers: Sequence[tuple[bytes, bytes]]) -> int:
    """The bytes of a parsed response head: status line, header lines, blank line."""
    size = _STATUS_LINE_OVERHEAD + reason_bytes
    for name, value in raw_headers:
        size += len(name) + len(value) + 4  # ": " and CRLF
    return size
