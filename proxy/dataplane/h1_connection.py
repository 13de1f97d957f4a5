"""One data-port connection: an asyncio protocol on httptools (llhttp).

Theory of operation. Bytes go straight from ``data_received`` to the parser, whose
callbacks build one ``H1Exchange`` (h1_exchange.py: the handler's view of a request,
and the writer of its answer) per request head. Exchanges are handled one at a time,
in order, by one task per connection (``_serve``): a head pipelined behind one being
answered waits in ``_queue`` (and reading pauses, so a client cannot queue without
bound); its body is buffered on its own exchange.

Connection states (``Phase``): ``IDLE`` between requests (the keep-alive idle timer
runs), ``HEAD`` while a head's bytes arrive (the head deadline runs: the first head
within ``request_head_timeout_s`` of the accept, each later one of its first byte,
like nginx's client_header_timeout), ``BODY`` until the message is complete, and
``CLOSING`` once nothing more is read (a refusal, a parse error, ``Connection:
close``, an upgrade not made). Both deadlines share one lazily re-armed timer per
connection (``Deadline``, deadline.py), so a request on a kept-alive connection creates
no timer.

The edge's rules, decided before the handler runs:
- Connection caps: one over a cap is answered 503 and closed before a byte of it is
  parsed.
- What a head may be (line, count and size caps, a declared body over the cap, the
  HTTP version, what llhttp refuses) is h1_head.py's; a refused head gets its
  OpenAI-shaped JSON answer (431, 413, 400, 405), counted by reason. A parse error in
  the body of a request being handled fails its body's reads with that 400 instead,
  and a chunked body gets 413 as soon as more than ``max_request_body_bytes`` arrived
  (its reads fail, an upstream request streaming it aborts).
- A refusal is answered in turn, after any answer still being written, then the
  connection closes.

Flow control: reading pauses while an exchange buffers more than ``_HIGH_WATER``
unread body bytes or a pipelined head waits, and resumes as the handler catches up;
``pause_writing``/``resume_writing`` from the transport make ``H1Exchange.write``
wait only while the client's socket is full, so a streamed answer costs one
``transport.write`` per chunk and no await otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from enum import Enum
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from proxy.core.edge_limits import (
    body_too_large_error,
    connection_refusal,
    head_timeout_error,
    head_too_large_error,
    malformed_error,
    raw_answer,
)
from proxy.core.errors import InternalError, ProxyError
from proxy.dataplane.deadline import Deadline
from proxy.dataplane.h1_exchange import H1Exchange, decode_headers
from proxy.dataplane.h1_head import (
    MAX_HEADERS,
    MAX_LINE_BYTES,
    HeadRefused,
    checked_head,
    parse_error_answer,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from proxy.core.edge_limits import ConnectionAdmission
    from proxy.dataplane.edge_options import EdgeOptions
    from proxy.dataplane.edge_report import EdgeReport
    from proxy.dataplane.exchange import Exchange

    Handler = Callable[[Exchange], Awaitable[None]]

logger = logging.getLogger(__name__)


_HIGH_WATER = 64 * 1024  # unread body bytes buffered before reading pauses
LINGER_S = 2.0  # after the last answer, how long a client's late bytes are read away


class Phase(Enum):
    """Where a connection is (see the module docstring)."""

    IDLE = "idle"
    HEAD = "head"
    BODY = "body"
    CLOSING = "closing"


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing with ``error`` as the answer
    (None: the refusal is already on its way)."""

    def __init__(self, error: ProxyError | None) -> None:
        super().__init__(error.code if error is not None else "stopped")
        self.error = error


class Owner(Protocol):
    """What a connection needs of its server (h1_server.H1Server)."""

    handler: Handler
    options: EdgeOptions
    report: EdgeReport
    admission: ConnectionAdmission
    connections: set[H1Connection]
    draining: bool

    def busy(self, delta: int) -> None: ...


class H1Connection(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, server: Owner) -> None:
        self.server = server
        self.options = server.options
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.phase = Phase.HEAD  # the first head is awaited from the accept
        self.ip: str | None = None
        self.local: tuple[str, int] | None = None
        self.tls = False
        self._admitted = False
        # The head deadline, the keep-alive timer and the linger share one (deadline.py).
        self._deadline = Deadline(self.loop)
        self._queue: deque[H1Exchange] = deque()
        self._current: H1Exchange | None = None  # being handled
        self._parsing: H1Exchange | None = None  # whose message is being parsed
        self._task: asyncio.Task[None] | None = None  # serves every exchange (_serve)
        self._next: asyncio.Future[None] | None = None  # its wait for the next exchange
        self._serving = False  # the task has taken its first step
        self._read_paused = False
        self.write_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._head_bytes = 0
        self._head_start = b""  # the first bytes of the head being parsed
        self._url = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport = cast("asyncio.Transport", transport)
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if isinstance(peer, tuple | list) and peer else None
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple | list) and len(local) >= 2:
            self.local = (str(local[0]), int(local[1]))
        self.tls = transport.get_extra_info("sslcontext") is not None
        reason = self.server.admission.admit(self.ip)
        if reason is not None:
            self.server.report.refused(reason)
            self._answer_raw(connection_refusal(reason, self.options.retry_after_s))
            return
        self._admitted = True
        self.server.connections.add(self)
        self._deadline.arm(self.options.head_timeout_s, self._head_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        self.phase = Phase.CLOSING
        if self._admitted:
            self._admitted = False
            self.server.admission.release(self.ip)
            self.server.connections.discard(self)
        self._wake_writer(ConnectionResetError("the client closed the connection"))
        for exchange in (self._current, *self._queue):
            if exchange is not None:
                exchange.disconnected()
        self._queue.clear()
        task = self._task
        if task is not None and not task.done():
            # The client hung up: its handler is cancelled, which closes the upstream
            # request instead of generating tokens nobody will read.
            task.cancel()
            if not self._serving and self._current is not None:
                # Cancelled before its first step, the task never runs _serve (nor the
                # finally that ends its exchange): the exchange ends here.
                self._current = None
                self.server.busy(-1)

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.CLOSING:
            return  # refused: nothing after a refusal is parsed
        if self.phase is Phase.IDLE:
            self.phase = Phase.HEAD
            self._deadline.arm(self.options.head_timeout_s, self._head_deadline)
        if self.phase is Phase.HEAD:
            if not self._head_bytes:
                self._head_start = data[:16]
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if not isinstance(refused, _Refused):
                raise  # a bug in a callback: the transport's own handler logs it
            if refused.error is not None:
                self._refuse(refused.error)
            return
        except httptools.HttpParserUpgrade:
            # An upgrade the proxy does not make: the request is answered, and nothing
            # after its head is read as HTTP.
            self._stop_reading()
            return
        except httptools.HttpParserError as exc:
            self._parse_error(exc)
            return
        if self.phase is Phase.HEAD and self._head_bytes > self.options.max_head_bytes:
            # No end of the head within the cap: refused without waiting for the rest.
            self.server.report.malformed("head_too_large", self.ip)
            self._refuse(head_too_large_error(self.options.max_head_bytes))

    def eof_received(self) -> bool | None:
        parsing = self._parsing
        if parsing is not None and self.phase is Phase.BODY:
            parsing.body_failed(None)  # the client ended mid-body
        return None  # close the transport

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writer(None)

    # --- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers = []
        if self.phase is Phase.IDLE:
            # A head begun in the read that ended the last message: its deadline runs.
            self.phase = Phase.HEAD
            self._deadline.arm(self.options.head_timeout_s, self._head_deadline)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_LINE_BYTES:
            self.server.report.malformed("head_too_large", self.ip)
            raise _Refused(malformed_error("head_too_large"))

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        if len(headers) > MAX_HEADERS or len(name) + len(value) + 2 > MAX_LINE_BYTES:
            self.server.report.malformed("head_too_large", self.ip)
            raise _Refused(malformed_error("head_too_large"))

    def on_headers_complete(self) -> None:
        parser = self.parser
        method = parser.get_method().decode("ascii", "replace")
        target = self._url.decode("utf-8", "surrogateescape")
        try:
            headers, version = checked_head(
                method, target, self._headers, parser.get_http_version(), self.options
            )
        except HeadRefused as refused:
            self.server.report.malformed(refused.reason, self.ip)
            raise _Refused(refused.error) from refused
        exchange = H1Exchange(self, method, target, version, headers,
                              keep_alive=parser.should_keep_alive())
        self._head_bytes = 0
        self._deadline.disarm()
        self.phase = Phase.BODY
        self._parsing = exchange
        self._enqueue(exchange)

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        if exchange is None:
            return
        limit = self.options.max_body_bytes
        if exchange.feed(body) and limit and exchange.received > limit:
            self.server.report.malformed("body_too_large", self.ip)
            self._refuse_body(exchange, body_too_large_error(limit))
            raise _Refused(None)  # stops the parser: nothing more is read
        if exchange.buffered > _HIGH_WATER:
            self.pause_reading()

    def on_message_complete(self) -> None:
        exchange = self._parsing
        self._parsing = None
        if exchange is not None:
            exchange.body_done()
            if not exchange.keep_alive:
                self._stop_reading()
                return
        self.phase = Phase.IDLE
        if self._current is None and not self._queue:
            self._deadline.arm(self.options.keepalive_timeout_s, self._idle_timeout)

    # --- exchanges -------------------------------------------------------------------

    def _enqueue(self, exchange: H1Exchange) -> None:
        if self._current is None:
            self._run(exchange)
        else:
            self._queue.append(exchange)
            self.pause_reading()  # one pipelined head waits; more wait in the socket

    def _run(self, exchange: H1Exchange) -> None:
        self._current = exchange
        self.server.busy(+1)
        if self._task is None:
            self._task = self.loop.create_task(self._serve(exchange))
            return
        # The connection's task is waiting for its next exchange (or, called from its
        # _finished, about to look for one): it takes ``_current``.
        waiter, self._next = self._next, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _serve(self, exchange: H1Exchange) -> None:
        """Handle ``exchange`` and every later one on this connection, in order.

        One task per connection, not per request: an asyncio task costs ~2.4 µs to
        create and run (its registration in the loop's WeakSet of tasks is Python
        code), a wake of a waiting one ~0.7 µs. The requests of a connection share its
        contextvars context; nothing in pinproxy sets a context variable.
        """
        self._serving = True
        try:
            while True:
                await self._handle(exchange)
                current = self._current
                if current is None:
                    transport = self.transport
                    if transport is None or transport.is_closing():
                        return
                    self._next = waiter = self.loop.create_future()
                    try:
                        await waiter
                    except asyncio.CancelledError:
                        if self._current is not None:
                            # Handed an exchange it never ran (the client left first).
                            self._current = None
                            self.server.busy(-1)
                        raise
                    current = self._current
                    if current is None:
                        return
                exchange = current
        finally:
            self._next = None
            self._task = None

    async def _handle(self, exchange: H1Exchange) -> None:
        try:
            if exchange.refusal is not None:
                await exchange.respond_error(exchange.refusal)
            else:
                await self.server.handler(exchange)
                if not exchange.response_started:
                    raise RuntimeError("the handler returned without answering")
        except asyncio.CancelledError:
            pass  # the client went away; connection_lost cleans up
        except Exception as exc:
            # The handler's own boundary answers everything; what reaches here is a
            # bug in the boundary itself or a write to a broken connection.
            if not exchange.response_started and self.transport is not None:
                self.server.report.unexpected(exc)
                await exchange.respond_error(InternalError())
            else:
                logger.debug("answer cut off: %r", exc)
                self.abort()
        finally:
            self.server.busy(-1)
            self._finished(exchange)

    def _finished(self, exchange: H1Exchange) -> None:
        """The answer to ``exchange`` is out (or cut off): the next one, or close."""
        self._current = None
        if self.transport is None or self.transport.is_closing():
            return
        if (not exchange.complete or not exchange.keep_alive or self.server.draining
                or exchange.refusal is not None or not exchange.body_complete):
            # An unread rest of a body, a refusal, Connection: close, shutdown: the
            # connection ends with this answer.
            self.close_gracefully()
            return
        if self._queue:
            self._run(self._queue.popleft())  # a refusal queued after it, too
            self.resume_reading()
            return
        if self.phase is Phase.CLOSING:
            self.close_gracefully()  # nothing more is read (an upgrade not made)
            return
        if self.phase is Phase.IDLE:
            self._deadline.arm(self.options.keepalive_timeout_s, self._idle_timeout)
        self.resume_reading()

    def keep_alive_for(self, exchange: H1Exchange) -> bool:
        """Whether the answer being written lets the connection serve another request."""
        return (exchange.keep_alive and not self.server.draining and exchange.refusal is None
                and (self.phase is not Phase.CLOSING or bool(self._queue)))

    # --- refusals --------------------------------------------------------------------

    def _parse_error(self, exc: httptools.HttpParserError) -> None:
        parsing = self._parsing
        if parsing is not None and self.phase is Phase.BODY:
            # The framing broke after a head was parsed (bad chunk sizes, a request
            # Transfer-Encoding that is not chunked): the body's reads fail with the 400.
            self.server.report.malformed("body_framing", self.ip)
            self._refuse_body(parsing, malformed_error("body_framing"))
            return
        # llhttp does not know TRACK: refused as a method (405), and not counted.
        reason, error = parse_error_answer(exc, self._head_start)
        if reason is not None:
            self.server.report.malformed(reason, self.ip)
        self._refuse(error)

    def _refuse(self, error: ProxyError) -> None:
        """Answer ``error`` in turn (after an answer still being written), then close."""
        parsing = self._parsing
        if parsing is not None and self.phase is Phase.BODY:
            return  # the body's own refusal answers (see _refuse_body)
        self._stop_reading()
        exchange = H1Exchange(self, "", "", (1, 1), decode_headers([]), keep_alive=False)
        exchange.refusal = error
        exchange.body_done()
        self._enqueue(exchange)

    def _refuse_body(self, exchange: H1Exchange, error: ProxyError) -> None:
        self._parsing = None
        self._stop_reading()
        if exchange.response_started:
            if exchange.complete:
                self.abort()
            return  # the handler's body reads fail; it cuts its answer off
        exchange.body_failed(error)

    def _stop_reading(self) -> None:
        self.phase = Phase.CLOSING
        self._deadline.disarm()

    # --- timers ----------------------------------------------------------------------

    def _head_deadline(self) -> None:
        if self.phase is not Phase.HEAD or self.transport is None:
            return
        if self._current is not None:
            # An answer is still being written; the half-sent head after it gets
            # another period rather than a 408 in the middle of that answer.
            self._deadline.arm(self.options.head_timeout_s, self._head_deadline)
            return
        self.server.report.timed_out("request_head")
        self._answer_raw(head_timeout_error(self.options.head_timeout_s))

    def _idle_timeout(self) -> None:
        if self.phase is Phase.IDLE and self._current is None and self.transport is not None:
            self.transport.close()

    # --- transport -------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self._queue:
            self._read_paused = False
            self.transport.resume_reading()

    async def drain(self) -> None:
        """Wait until the client's socket takes bytes again (``pause_writing``)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client connection is closed")
        if self._writable is None:
            self._writable = self.loop.create_future()
        await self._writable

    def _wake_writer(self, exc: Exception | None) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def close_if_idle(self) -> None:
        """Shutdown: a connection with nothing in flight closes now."""
        if self._current is None and self.transport is not None:
            self.transport.close()

    def close_gracefully(self) -> None:
        """Close after the last answer without destroying it.

        Closing a socket with bytes of the client's still unread makes the kernel
        answer with a reset, which can discard the answer before the client reads it.
        So (like nginx's lingering_close) this side's FIN goes first, then what the
        client still sends is read and dropped until it closes, for ``LINGER_S`` at most.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._stop_reading()  # from now on every byte is dropped unparsed
        self._queue.clear()
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        self._deadline.arm(LINGER_S, self.abort)

    def abort(self) -> None:
        """Cut the connection off (an answer that cannot be completed)."""
        if self.transport is not None:
            self.transport.close()

    def _answer_raw(self, error: ProxyError) -> None:
        self._stop_reading()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(raw_answer(error))
            self.close_gracefully()

    def __repr__(self) -> str:
        return f"H1Connection({self.ip}, {self.phase.value})"
