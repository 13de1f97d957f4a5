"""A lean HTTP/1.1 client to the backends, for requests whose body is held in memory.

Theory of operation. aiohttp's client spends more CPU per request than the rest of
pinproxy's request path together (per-request timers, trace hooks, cookie handling,
a writer task, a StreamReader per response). A proxy that already holds the whole
request body needs none of that. Per backend origin this pool keeps idle keep-alive
connections; a request is serialised once and written with one ``transport.write``;
llhttp (httptools) parses the response, and body chunks are handed to the relay as
they arrive.

- A connection is either idle in its origin's list or owned by one response. It goes
  back only when that response was read to its end and both sides allow keep-alive;
  anything else closes it, so a connection never carries a half-read answer.
- A reused idle connection may have been closed by the backend meanwhile. When it
  fails before any byte of the response came back, the request is written once more
  on a fresh connection to the same backend, but only when the caller says it is
  replayable (idempotent method or an Idempotency-Key): the backend may have read it
  before closing, and a replayed completion is billed twice (Go's transport rule). Any
  other failure is the caller's, as ``UpstreamConnectError`` (nothing was written) or
  ``UpstreamDropped`` (written, no head came back).
- A connection goes back to the pool only once its response was read to the end and
  nothing followed it, and it is lent again only after it has stayed quiet for
  ``reuse_quiet_s`` (oldest idle first): a backend that writes a second, unsolicited
  response shortly after a complete one has its connection closed while idle (any
  byte on an idle connection closes it) instead of having that response read as the
  answer to the next, unrelated request.
- Backpressure: past ``_HIGH_WATER`` unread bytes the socket stops being read until
  the relay takes what is buffered (it always takes all of it at once).
- A response ends the connection's business until it is finished: bytes past its end
  (a second response nobody asked for) close the connection rather than join a body.
- Response heads are bounded (``HeadLimits``): bytes received while the head is
  awaited (interim 1xx heads included) beyond ``max_bytes``, or a header beyond
  ``max_headers``, fail the request with ``UpstreamHeadTooLarge`` and close the
  connection; nothing of that head is relayed, and at most one read past the cap
  is buffered.
- Timeouts: connecting is bounded by ``connect_timeout_s``; each silence while the
  response is awaited (head or body) by ``read_idle_timeout_s``, checked by one timer
  per connection against the time of the last byte, so reading costs no timer.

The pool of these connections is in http1_pool.py. Streamed (unheld) bodies and HEAD
requests keep using aiohttp's client (upstream.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.core.errors import (
    UpstreamBodyError,
    UpstreamDropped,
    UpstreamError,
    UpstreamHeadTooLarge,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from proxy.config.settings import UpstreamConfig


_HIGH_WATER: Final = 256 * 1024
# aiohttp's rule, kept so both clients frame requests alike: methods that anticipate
# no content send no Content-Length for an empty body; the others send 0.
_NO_CONTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

Origin = tuple[str, str, int]  # scheme, host, port
_STATUS_LINE_OVERHEAD: Final = len("HTTP/1.1 200 \r\n") + len("\r\n")


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


class Target:
    """Where a backend base URL sends requests: origin, Host header and path prefix."""

    __slots__ = ("host_header", "origin", "prefix")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        scheme = parts.scheme
        host = parts.hostname or ""
        default = 443 if scheme == "https" else 80
        port = parts.port or default
        self.origin: Origin = (scheme, host, port)
        shown = f"[{host}]" if ":" in host else host
        self.host_header = shown if port == default else f"{shown}:{port}"
        self.prefix = parts.path.rstrip("/")

    def __repr__(self) -> str:
        return f"Target({self.origin!r}, prefix={self.prefix!r})"


def request_bytes(
    method: str, target: str, host: str, headers: Mapping[str, str], body: bytes
) -> bytes:
    """The request as written on the wire: head (UTF-8, the client's bytes kept) and body."""
    parts = [method, " ", target, " HTTP/1.1\r\nHost: ", host, "\r\n"]
    for name, value in headers.items():
        parts += (name, ": ", value, "\r\n")
    if body or method not in _NO_CONTENT_METHODS:
        parts += ("Content-Length: ", str(len(body)), "\r\n")
    parts.append("\r\n")
    # surrogateescape: header bytes that were not UTF-8 go out as they came in.
    return "".join(parts).encode("utf-8", "surrogateescape") + body


class Http1Response:
    """A response whose head is in; the body is read with ``read_chunk``."""

    __slots__ = ("_conn", "content_type", "headers", "reason", "status")

    def __init__(self, conn: Connection, status: int, reason: str,
                 headers: CIMultiDictProxy[str]) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        content_type = headers.get("Content-Type")
        self.content_type = (
            "application/octet-stream"
            if content_type is None
            else content_type.partition(";")[0].strip().lower()
        )

    async def read_chunk(self) -> bytes:
        """The next part of the body (all that has arrived); ``b""`` at its end."""
        return await self._conn.read_chunk()

    def whole_body(self) -> bytes | None:
        """The whole body when all of it has already arrived (then read), else None."""
        return self._conn.whole_body()

    def release(self) -> None:
        """Done with a fully read response: the connection may serve another request."""
        self._conn.finish(reuse=True)

    def close(self) -> None:
        """Done before the end (or after an error): the connection is closed."""
        self._conn.finish(reuse=False)

    def __repr__(self) -> str:
        return f"Http1Response({self.status}, {self._conn!r})"


class ConnectionOwner(Protocol):
    """What a connection tells its pool (http1_pool.py)."""

    def put_idle(self, conn: Connection) -> None:
        """A finished connection may serve another request."""
        ...

    def forget(self, conn: Connection) -> None:
        """The connection closed: its slot is free."""
        ...


class Connection(asyncio.Protocol):
    """One keep-alive connection; llhttp's callbacks (``on_*``) fill in the response."""

    def __init__(
        self,
        pool: ConnectionOwner,
        origin: Origin,
        idle_timeout_s: float,
        limits: HeadLimits = DEFAULT_HEAD_LIMITS,
    ) -> None:
        self._pool = pool
        self._limits = limits
        self.origin = origin
        self._loop = asyncio.get_running_loop()
        self._idle_timeout_s = idle_timeout_s
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.reused = False
        self.pooled = False  # waiting in the pool's idle list
        self.idle_since = 0.0
        self._begin()

    def _begin(self) -> None:
        self._busy = False
        self._status = 0
        self._reason: list[bytes] = []
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # received while the head is awaited (interim heads too)
        self._head_size = 0  # of the heads parsed so far (interim ones)
        self._interim = False
        self._head: Http1Response | None = None
        self._complete = False
        self._keep_alive = False
        self._until_eof = False
        self._error: UpstreamError | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self.got_bytes = False
        self._last_read = 0.0

    # --- used by the pool and the response -------------------------------------------

    def send(self, payload: bytes) -> None:
        assert self._transport is not None
        self._busy = True
        self._last_read = self._loop.time()
        self._transport.write(payload)

    async def read_head(self) -> Http1Response:
        while self._head is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._head

    async def read_chunk(self) -> bytes:
        while True:
            if self._chunks:
                return self._take_buffered()
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()

    def whole_body(self) -> bytes | None:
        return self._take_buffered() if self._complete else None

    def _take_buffered(self) -> bytes:
        """Everything buffered, at once; reading resumes if it was paused for it."""
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    def finish(self, *, reuse: bool) -> None:
        if self.closed:
            return
        if reuse and self._complete and self._keep_alive and not self._chunks:
            self._cancel_timer()
            self._begin()
            self.reused = True
            self.idle_since = self._loop.time()
            self._pool.put_idle(self)
        else:
            self.abort()

    def abort(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()
        self._mark_closed()

    def usable(self) -> bool:
        return not self.closed and self._transport is not None and not self._transport.is_closing()

    # --- waiting, with the idle timeout ----------------------------------------------

    async def _wait(self) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        if self._timer is None:
            self._timer = self._loop.call_at(
                self._last_read + self._idle_timeout_s, self._check_idle
            )
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_idle(self) -> None:
        self._timer = None
        if self._waiter is None or self.closed:
            return
        due = self._last_read + self._idle_timeout_s
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check_idle)
            return
        self._fail(
            UpstreamTimeout("the backend did not answer in time")
            if self._head is None
            else UpstreamBodyError("the backend went silent mid-response")
        )
        self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self._wake()

    def _mark_closed(self) -> None:
        if not self.closed:
            self.closed = True
            self._cancel_timer()
            self._pool.forget(self)

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        self._transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self._last_read = self._loop.time()
        if not self._busy:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self.abort()
            return
        awaiting_head = self._head is None
        if awaiting_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
            if awaiting_head and self._head is None:
                # No end of the head yet: refuse it without buffering the rest.
                self._check_head(self._head_bytes, len(self._raw_headers))
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the backend switched protocols"))
            self.abort()
        except (httptools.HttpParserError, UpstreamHeadTooLarge) as exc:
            # A head over the limits failed already (its callback raised): that error stays.
            message = "the backend sent an invalid response"
            self._fail(UpstreamBodyError(message) if self._head else UpstreamError(message))
            self.abort()
            del exc

    def _check_head(self, size: int, count: int) -> None:
        problem = self._limits.exceeded(size, count)
        if problem is not None:
            error = UpstreamHeadTooLarge(problem)
            self._fail(error)
            raise error  # out of llhttp's callback or feed_data: stop parsing

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost tells the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._busy and not self._complete:
            if self._until_eof and self._head is not None and exc is None:
                self._complete = True  # a body delimited by the end of the connection
                self._keep_alive = False
                self._wake()
            elif self._head is None:
                # The request was written: the backend may have acted on it.
                self._fail(UpstreamDropped(
                    "the backend closed the connection before answering"
                    if exc is None else f"connection to the backend failed: {exc}",
                    reused=self.reused,
                ))
            else:
                self._fail(UpstreamBodyError("the backend closed the connection mid-response"))
        self._mark_closed()

    # --- llhttp callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            # llhttp would parse on into a second response; raising makes feed_data fail
            # (HttpParserCallbackError), which closes the connection.
            raise UpstreamError("the backend sent more than one response")

    def on_status(self, reason: bytes) -> None:
        self._reason.append(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))
        if len(self._raw_headers) > self._limits.max_headers:
            self._check_head(0, len(self._raw_headers))

    def on_headers_complete(self) -> None:
        size = self._head_size + response_head_size(sum(map(len, self._reason)), self._raw_headers)
        self._check_head(size, len(self._raw_headers))
        self._head_size = size  # an interim head's bytes count against the final one's cap
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._interim = True
            return
        headers = CIMultiDictProxy(CIMultiDict(
            [(n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
             for n, v in self._raw_headers]
        ))
        self._until_eof = (
            status not in (204, 304)
            and "Content-Length" not in headers
            and "Transfer-Encoding" not in headers
        )
        self._head = Http1Response(
            self, status, b"".join(self._reason).decode("utf-8", "surrogateescape"), headers
        )
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._reason.clear()
            self._raw_headers.clear()
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive() and not self._until_eof
        self._cancel_timer()
        self._wake()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "busy" if self._busy else "idle"
        scheme, host, port = self.origin
        return f"Connection({scheme}://{host}:{port}, {state}, reused={self.reused})"
