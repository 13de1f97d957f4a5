"""pinproxy's HTTP/1.1 client connection to a backend: one asyncio protocol, llhttp parsing.

Theory of operation. aiohttp's client spends several times the CPU of this one per
request (per-request timers, trace hooks, cookie handling, a writer task, a
StreamReader per response: bench/RESULTS.md). A request with a held body is
serialised once and written with one ``transport.write``; llhttp (httptools) parses
the response, and body chunks are handed to the relay as they arrive. The decisions
(reuse, replay, what a lost connection means) are pure functions in state.py.

- A connection is in one ``ConnState``. It goes back to the pool only when its
  response was read to its end, both sides allow keep-alive, its whole request was
  written and nothing unread is buffered; anything else closes it, so a connection
  never carries half an exchange into the next request.
- A streamed request body (one not held in memory) is written while the response is
  awaited, with write flow control (writer.py). When the client's stream fails before
  the head came back, that failure is what the request raises; the connection closes.
- An answer to HEAD has no body, whatever its framing headers say (llhttp is not told
  the method): it is complete with its head, keep-alive is read off its head, and the
  next request gets a fresh parser.
- Interim answers (100 Continue, 103 Early Hints) are skipped; the final head follows.
- Response heads are bounded (``state.HeadLimits``): bytes received while the head is
  awaited (interim heads included) beyond ``max_bytes``, or a header beyond
  ``max_headers``, fail the request with ``UpstreamHeadTooLarge`` and close the
  connection; nothing of that head is relayed, and at most one read past the cap is
  buffered.
- Backpressure on reading: past ``_HIGH_WATER`` unread bytes the socket stops being read
  until the relay takes what is buffered (it always takes all of it at once).
- The relay reads a body with ``take_chunk`` (everything buffered, without waiting) and
  awaits ``arrival()``, a bare future, only when nothing is there: no coroutine per
  piece. ``read_chunk`` is the same for callers that prefer one await.
- A response ends the connection's business until it is finished: bytes past its end
  (a second response nobody asked for) close the connection rather than join a body.
- Timeouts: connecting is bounded by ``connect_timeout_s`` (pool.py); each silence
  while the response is awaited (head or body) by ``read_idle_timeout_s``, checked by
  one timer per connection against the time of the last byte either way, so reading
  costs no timer and a slow upload does not count as the backend's silence. The timer
  is left set when a response completes: a request on a pooled connection reuses it
  (it fires, finds the new waiter and sets itself for the rest) instead of creating
  and cancelling one per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Final, Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.core.errors import (
    UpstreamBodyError,
    UpstreamDropped,
    UpstreamError,
    UpstreamHeadTooLarge,
    UpstreamTimeout,
)
from proxy.upstream.framing import Origin, Target, framed_body, request_bytes
from proxy.upstream.response import Http1Response
from proxy.upstream.state import (
    DEFAULT_HEAD_LIMITS,
    ConnState,
    HeadLimits,
    Lost,
    keep_alive_of,
    lost,
    response_head_size,
    reusable,
)
from proxy.upstream.writer import BodyWriter

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Callable

__all__ = ["Connection", "ConnectionOwner", "HeadLimits", "Http1Response", "Origin", "Target",
           "request_bytes"]

_HIGH_WATER: Final = 256 * 1024


class ConnectionOwner(Protocol):
    """What a connection tells its pool (pool.py)."""

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
        self._write_paused = False  # the transport's buffer is over its high-water mark
        self._writer: BodyWriter | None = None  # of a streamed body
        self.closed = False  # by either side: never used again
        self.reused = False
        self.pooled = False  # waiting in the pool's idle list
        self.idle_since = 0.0
        self._begin()

    def _begin(self) -> None:
        self.state = ConnState.IDLE
        self._reason: list[bytes] = []
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # received while the head is awaited (interim heads too)
        self._head_size = 0  # of the heads parsed so far (interim ones)
        self._interim = False
        self._head_only = False  # answering HEAD: no body, whatever the head says
        self._scan_tail = b""  # of an answer to HEAD: see _feed_head_only
        self._head: Http1Response | None = None
        self._keep_alive = False
        self._until_eof = False
        self._request_sent = False
        self._error: BaseException | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._sink: Callable[[bytes], bool] | None = None  # see stream_to
        self._sink_error: Exception | None = None
        self._paused = False
        self.got_bytes = False
        self._last_io = 0.0

    # --- used by the pool and the response -------------------------------------------

    def send(self, payload: bytes, *, head_only: bool = False) -> None:
        """Write a whole request (head and held body). ``head_only``: it is a HEAD."""
        self._start(payload, head_only)
        self._request_sent = True

    def send_streamed(self, head: bytes, body: AsyncIterable[bytes], declared: int | None) -> None:
        """Write a request's head, then its body from ``body`` as it comes (writer.py).

        ``declared``: the body's Content-Length, else it is framed chunked.
        """
        self._start(head, head_only=False)
        self._writer = BodyWriter(self, framed_body(body, declared), paused=self._write_paused)

    def _start(self, payload: bytes, head_only: bool) -> None:
        assert self._transport is not None
        self.state = ConnState.AWAITING_HEAD
        self._head_only = head_only
        self._last_io = self._loop.time()
        self._transport.write(payload)

    def body_failed(self, exc: Exception) -> None:
        """The streamed body's writer stopped on ``exc`` (``writer.BodySink``)."""
        if self.state is ConnState.AWAITING_HEAD:
            self._error = exc  # what the request raises: the client's own failure
            self._wake()
        else:
            self._fail(UpstreamBodyError("the request body failed mid-exchange"))
        self.abort()

    def write(self, data: bytes) -> None:
        """Part of a streamed body, to the transport (``writer.BodySink``)."""
        if self._transport is not None:
            self._transport.write(data)
            self._last_io = self._loop.time()

    async def read_head(self) -> Http1Response:
        while self._head is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._head

    async def read_chunk(self) -> bytes:
        while (data := self.take_chunk()) is None:
            await self._wait()
        return data

    def take_chunk(self) -> bytes | None:
        """All the body buffered so far, ``b""`` at its end, None while nothing is here."""
        if self._sink_error is not None:
            raise self._sink_error
        if self._chunks:
            return self._take_buffered()
        if self.state is ConnState.COMPLETE:
            return b""
        if self._error is not None:
            raise self._error
        return None

    def arrival(self) -> asyncio.Future[None]:
        """A future done when more of the response arrives, it ends, or it fails.

        Awaiting it costs the relay one future per wake and no coroutine; the idle
        timeout still bounds the wait.
        """
        waiter = self._loop.create_future()
        self._waiter = waiter
        if self._timer is None:
            self._timer = self._loop.call_at(self._last_io + self._idle_timeout_s, self._check_idle)
        return waiter

    def stream_to(self, sink: Callable[[bytes], bool] | None) -> None:
        """While set, each piece of the body parsed goes to ``sink`` at once, unbuffered.

        For the relay while it awaits ``arrival()``: a piece then costs no wake of its
        task. ``sink`` returns False to stop (the client's socket is full: what follows
        is buffered, and reading pauses past the high-water mark); the waiter is woken
        then, and when ``sink`` raises (``take_chunk`` raises it next), and as ever when
        the body ends or fails. Only a body with nothing buffered is sent to ``sink``.
        """
        self._sink = sink

    def whole_body(self) -> bytes | None:
        if self.state is not ConnState.COMPLETE or self._head_only:
            return None
        return self._take_buffered()

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
        if reuse and reusable(
            self.state, keep_alive=self._keep_alive,
            request_sent=self._request_sent if self._writer is None else self._writer.done,
            unread=bool(self._chunks),
        ):
            # The idle timer stays set: it finds no waiter and stops, or finds the next
            # request's and sets itself for that one's last byte (see _check_idle).
            if self._head_only:
                # llhttp still expects the body the HEAD answer's head described.
                self._parser = httptools.HttpResponseParser(self)
            self._writer = None
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
        waiter = self.arrival()
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None  # cancelled: nobody waits any more

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None  # woken once: a waiter that looks again asks anew
            if not waiter.done():
                waiter.set_result(None)

    def _check_idle(self) -> None:
        self._timer = None
        if self._waiter is None or self.closed:
            return
        due = self._last_io + self._idle_timeout_s
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
        if self._error is None and self.state is not ConnState.COMPLETE:
            self._error = error
        self._wake()

    def _mark_closed(self) -> None:
        if not self.closed:
            self.closed = True
            if self.state is not ConnState.COMPLETE:
                # Whoever waits on this exchange must learn of its end (the cause, if
                # known, was set first).
                self._fail(UpstreamBodyError("the connection to the backend closed")
                           if self._head is not None
                           else UpstreamDropped("the connection to the backend closed"))
            self._cancel_timer()
            if self._writer is not None:
                self._writer.stop()  # the connection it wrote to is gone
            self._pool.forget(self)

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        self._transport = cast("asyncio.Transport", transport)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._writer is not None:
            self._writer.pause()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._writer is not None:
            self._writer.resume()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self._last_io = self._loop.time()
        if self.state is ConnState.IDLE:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self.abort()
            return
        awaiting_head = self._head is None
        if awaiting_head:
            self._head_bytes += len(data)
        try:
            if self._head_only:
                self._feed_head_only(data)
            else:
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

    def _feed_head_only(self, data: bytes) -> None:
        """Feed llhttp an answer to HEAD up to the end of its final head, never past it.

        The answer has no body whatever its head says, but llhttp parses on by the
        head's framing: after ``Transfer-Encoding: chunked`` it would take what follows
        (a broken backend's ``0\r\n\r\n``, or the start of a stray response) as chunk
        framing, without a callback, and the connection would look clean. So the heads
        are found here; bytes after the final one, other than empty lines (which llhttp
        judges as after any answer), close the connection.
        """
        if self._head is None:
            # Where each head ends; 3 bytes of the last packet catch a split terminator.
            tail = self._scan_tail
            joined = tail + data
            pos = 0  # of ``data``, fed so far
            while True:
                end = joined.find(b"\r\n\r\n", max(0, len(tail) + pos - 3))
                if end < 0:
                    self._parser.feed_data(data[pos:])
                    self._scan_tail = joined[-3:]
                    return
                cut = end + 4 - len(tail)
                self._parser.feed_data(data[pos:cut])
                pos = cut
                if self._head is not None or self.closed:
                    break  # the final head (interim ones loop on to the next)
            data = data[pos:]
        if data.strip(b"\r\n"):
            # A body, or a stray answer: the answer stands (it is complete), the
            # connection does not (as when llhttp itself reports a body: on_body).
            self._keep_alive = False
            self.abort()
        elif data:
            self._parser.feed_data(data)

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
        verdict = lost(self.state, until_eof=self._until_eof, clean=exc is None)
        if verdict is Lost.COMPLETES:
            self.state = ConnState.COMPLETE
            self._keep_alive = False
            self._wake()
        elif verdict is Lost.DROPPED:
            # The request was written: the backend may have acted on it.
            self._fail(UpstreamDropped(
                "the backend closed the connection before answering"
                if exc is None else f"connection to the backend failed: {exc}",
                reused=self.reused,
            ))
        elif verdict is Lost.BODY_BROKEN:
            self._fail(UpstreamBodyError("the backend closed the connection mid-response"))
        self._mark_closed()

    # --- llhttp callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state is ConnState.COMPLETE:
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
        reason = b"".join(self._reason).decode("utf-8", "surrogateescape")
        self._head = Http1Response(self, status, reason, headers)
        if self._head_only:
            self._keep_alive = keep_alive_of(
                self._parser.get_http_version(), headers.get("Connection")
            )
            self._completed()
            return
        self.state = ConnState.READING_BODY
        self._until_eof = (
            status not in (204, 304)
            and "Content-Length" not in headers
            and "Transfer-Encoding" not in headers
        )
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._head_only:
            raise UpstreamError("the backend sent a body with its answer to HEAD")
        sink = self._sink
        if sink is not None and not self._chunks:
            try:
                if sink(body):
                    return
            except Exception as exc:  # the client's side failed; out of llhttp's callback
                self._sink_error = exc
            self._sink = None
            self._wake()
            return
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
        if self._head_only:
            return  # complete with its head already (a zero length, or no framing)
        self._keep_alive = self._parser.should_keep_alive() and not self._until_eof
        self._completed()

    def _completed(self) -> None:
        self.state = ConnState.COMPLETE
        self._wake()

    def __repr__(self) -> str:
        scheme, host, port = self.origin
        state = "closed" if self.closed else self.state.value
        return f"Connection({scheme}://{host}:{port}, {state}, reused={self.reused})"
