"""The admin and metrics listeners' HTTP server: aiohttp's, with the edge's limits.

(The data port has its own server, h1_server.py, with the same limits.)

Theory of operation. aiohttp's low-level server (``web.Server``) makes one
``RequestHandler`` (an asyncio protocol) per connection; ``EdgeServer`` makes an
``EdgeProtocol`` instead, which keeps aiohttp's parsing and dispatch and adds:

- Connection caps. ``connection_made`` counts the connection in all and per peer IP
  (``ConnectionAdmission``); one over a cap is answered 503 and closed at once,
  before any byte of it is parsed. ``connection_lost`` releases what was counted.
- A request-head deadline. A connection's first head must be whole within
  ``request_head_timeout_s`` of the connection opening, and each later one within
  that long of its first byte, else 408 and the connection is closed: a client
  sending a byte a second holds a connection for seconds, not for the hour of
  aiohttp's keep-alive timeout. Between requests the keep-alive idle timeout
  (aiohttp's own, ``keepalive_timeout_s``) applies. The parser says when a head is
  whole: aiohttp counts each message it parses (``_request_count``), and a head is
  awaited whenever the last parsed request's body is complete.
- Malformed requests. aiohttp answers what its parser refuses through
  ``handle_error``, which here gives the OpenAI-shaped JSON 400 (431 for an oversized
  head) instead of a text echoing the bytes, counts it, and warns at most once per
  ``_WARN_EVERY_S``. A parse error inside the body of a request being handled (broken
  chunk framing) would leave that request's reads waiting forever; its body's reads
  fail instead, so the request answers 400 and a streamed upstream request is
  aborted. Once a body is refused, nothing more is read from the connection, and it
  closes with the answer.
- Sizes. Each parsed head is measured (``request_head_size``) against
  ``max_request_head_bytes``, and so are the bytes of a head still arriving, so a
  runaway head is refused without waiting for (or buffering) the rest; a head whose
  Content-Length is over ``max_request_body_bytes`` is refused before its handler
  runs. Either refusal replaces the queued request (and any pipelined after it) with
  an ``_ErrInfo``, aiohttp's own entry for a parse error, so it is answered in turn
  after a response still being written. A chunked body is counted as it is fed
  (``StreamReader.total_bytes``) and refused like broken framing once over the cap.
- No banner. Every response's writer is made with an ``on_headers_sent`` hook
  (edge_options.py) that sets ``Server`` to ``server_header`` or drops it.

aiohttp offers no public hook between the bytes and the parser, so ``data_received``
reads four of ``RequestHandler``'s attributes (``_request_count``, ``_messages``,
``_waiter`` and ``_request_in_progress``) and queues aiohttp's ``_ErrInfo``; the
integration tests (tests/integration/dataplane/test_edge_*.py) pin what this relies on.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web
from aiohttp.http import HttpProcessingError, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from proxy.core.edge_limits import (
    ConnectionAdmission,
    body_too_large_error,
    connection_refusal,
    declared_body_too_large,
    head_timeout_error,
    head_too_large_error,
    malformed_error,
    malformed_reason,
    raw_answer,
    request_head_size,
    unparsed_method_refusal,
)
from proxy.core.errors import HandlerTimeout, InternalError, ProxyError
from proxy.dataplane.edge_options import EdgeOptions, bannered
from proxy.dataplane.edge_report import EdgeReport
from proxy.dataplane.relay import error_response

if TYPE_CHECKING:
    from aiohttp.streams import StreamReader

    from proxy.telemetry.metrics import ProxyMetrics


class EdgeServer(web.Server):
    """aiohttp's low-level server whose connections are ``EdgeProtocol``s."""

    def __init__(
        self,
        handler: Any,
        *,
        options: EdgeOptions,
        metrics: ProxyMetrics,
        **kwargs: Any,
    ) -> None:
        kwargs["keepalive_timeout"] = options.keepalive_timeout_s
        super().__init__(handler, **kwargs)
        self.options = options
        self.admission = ConnectionAdmission(
            options.max_connections, options.max_connections_per_ip
        )
        self._report = EdgeReport(options.name, metrics)
        self._loop_ = asyncio.get_running_loop()
        # What aiohttp's Server would hand each RequestHandler (it keeps them private).
        self._protocol_kwargs = {
            k: v for k, v in kwargs.items() if k not in ("request_factory", "handler_cancellation")
        }
        self.request_factory = bannered(self.request_factory, options.server_header,
                                        self._loop_)

    def __call__(self) -> RequestHandler:
        return EdgeProtocol(self, loop=self._loop_, **self._protocol_kwargs)

    def refused(self, reason: str) -> None:
        self._report.refused(reason)

    def timed_out(self, phase: str) -> None:
        self._report.timed_out(phase)

    def malformed(self, reason: str, peer: str | None) -> None:
        self._report.malformed(reason, peer)

    def unexpected(self, exc: BaseException | None) -> None:
        self._report.unexpected(exc)

    def __repr__(self) -> str:
        return f"EdgeServer({self.options.name}, {self.admission!r})"


class EdgeAppRunner(web.AppRunner):
    """``web.AppRunner`` for an application (with its router) behind ``EdgeServer``."""

    def __init__(
        self, app: web.Application, *, options: EdgeOptions, metrics: ProxyMetrics, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._options = options
        self._metrics = metrics

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # starts the application, routes it
        return EdgeServer(
            made.request_handler,
            request_factory=made.request_factory,
            options=self._options,
            metrics=self._metrics,
            **self._kwargs,
        )


class EdgeProtocol(RequestHandler):
    """One client connection: aiohttp's protocol, with caps and the head deadline."""

    __slots__ = ("_admitted", "_answered", "_body", "_body_refused", "_edge", "_head_bytes",
                 "_head_refused", "_head_timer", "_ip")

    def __init__(self, manager: EdgeServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._edge = manager
        self._ip: str | None = None
        self._admitted = False
        self._head_timer: asyncio.TimerHandle | None = None
        # The body of the last request head parsed; None before the first one.
        self._body: StreamReader | None = None
        self._answered: StreamReader | None = None  # the body of the last request answered
        self._body_refused = False  # a body's reads fail: the connection ends with the answer
        self._head_bytes = 0  # bytes of the head being awaited, so far
        self._head_refused = False  # a refusal is queued: nothing more is read

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple | list) and peer else None
        edge = self._edge
        reason = edge.admission.admit(ip)
        if reason is not None:
            edge.refused(reason)
            self._answer_and_close(connection_refusal(reason, edge.options.retry_after_s))
            return
        self._ip, self._admitted = ip, True
        # Like nginx's client_header_timeout: the first head is timed from the accept.
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        if self._admitted:
            self._admitted = False
            self._edge.admission.release(self._ip)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._admitted or self._body_refused or self._head_refused:
            return  # refused: its bytes are never parsed (nor what follows a refusal)
        # Bytes that arrive once the last body is complete, and complete no head, are
        # all head bytes: only those start the deadline and count against the head cap.
        # (A chunk that ends a body and begins a head starts them with the next chunk,
        # one read later; the parsed head's own size is checked in any case.)
        in_head = self._awaiting_head()
        if in_head:
            self._head_bytes += len(data)
        parsed, current = self._request_count, self._body
        super().data_received(data)
        if self.transport is None:
            return
        if current is not None:
            self._check_body_size(current)
        new = self._request_count - parsed
        options = self._edge.options
        if new:
            self._cancel_head_timer()
            self._head_bytes = 0
            for index, (message, payload) in enumerate(list(self._messages)[-new:]):
                if isinstance(message, RawRequestMessage):
                    refusal = self._head_refusal(message)
                    if refusal is not None:
                        self._refuse_queued(new - index, refusal)
                        return
                    self._body = payload
                    self._check_body_size(payload)
                    continue
                body = self._body
                if body is not None and not body.is_eof():
                    # The parse error is in the body of the request being handled:
                    # aiohttp would leave its reads waiting for bytes that never come.
                    exc = getattr(message, "exc", None)
                    self._refuse_body(body, self._malformed(exc, in_body=True))
                self._body = None
        elif in_head:
            if self._head_bytes > options.max_head_bytes:
                # No end of the head within the cap: refused without waiting for the rest.
                self._edge.malformed("head_too_large", self._ip)
                self._refuse_queued(0, head_too_large_error(options.max_head_bytes))
                return
            if self._head_timer is None:
                self._arm_head_timer()

    def _check_body_size(self, body: StreamReader) -> None:
        """A body of undeclared length (chunked) that grew past the cap, whole or not,
        fails its request's reads with 413; one already streaming upstream is aborted."""
        limit = self._edge.options.max_body_bytes
        if limit and body.total_bytes > limit and not self._body_refused:
            self._edge.malformed("body_too_large", self._ip)
            self._refuse_body(body, body_too_large_error(limit))

    def _head_refusal(self, message: RawRequestMessage) -> ProxyError | None:
        """Why a parsed request head is refused before it is handled, if it is."""
        options = self._edge.options
        size = request_head_size(message.method, message.path, message.raw_headers)
        if size > options.max_head_bytes:
            self._edge.malformed("head_too_large", self._ip)
            return head_too_large_error(options.max_head_bytes)
        limit = options.max_body_bytes
        if declared_body_too_large(message.headers.get(hdrs.CONTENT_LENGTH), limit):
            self._edge.malformed("body_too_large", self._ip)
            return body_too_large_error(limit)
        return None

    def _refuse_queued(self, drop: int, error: ProxyError) -> None:
        """Answer ``error`` in turn and close: the last ``drop`` queued requests (the
        refused one and any pipelined after it) are never handled, nothing more is read.

        The answer is queued like a parse error (aiohttp's ``_ErrInfo``), so a response
        still being written for an earlier request is finished first.
        """
        self._cancel_head_timer()
        self._head_refused = True
        self._body = None
        for _ in range(drop):
            self._messages.pop()
        self._messages.append(
            (_ErrInfo(status=error.status, exc=error, message=error.message), EMPTY_PAYLOAD)
        )
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._answered = request.content
            if self._body_refused:
                # Whatever is left of the refused body is never read: no lingering read
                # of it (aiohttp's), no next request parsed from it.
                self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse or handle, as JSON.

        Never the raw bytes (aiohttp's own text echoes them), never a traceback; a
        malformed request is counted and warned about at most once per interval.
        """
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; the connection is broken")
        if isinstance(exc, ProxyError):
            error = exc  # refused by the edge itself (_refuse_queued), already counted
        elif isinstance(exc, HttpProcessingError):
            kinds = [kind.__name__ for kind in type(exc).__mro__]
            error = unparsed_method_refusal(kinds, str(exc.message)) or self._malformed(
                exc, in_body=False
            )
        elif status == 504:
            error = HandlerTimeout("pinproxy did not finish the request in time")
        else:
            self._edge.unexpected(exc)
            error = InternalError()
        response = error_response(error)
        response.force_close()
        return response

    def _malformed(self, exc: BaseException | None, *, in_body: bool) -> ProxyError:
        kinds = [kind.__name__ for kind in type(exc).__mro__] if exc is not None else []
        text = exc.message if isinstance(exc, HttpProcessingError) else ""
        reason = malformed_reason(kinds, str(text), in_body=in_body)
        self._edge.malformed(reason, self._ip)
        return malformed_error(reason)

    def _refuse_body(self, body: StreamReader, error: ProxyError) -> None:
        """Fail the reads of ``body`` with ``error``: its request is answered with it."""
        self._body_refused = True
        if body is self._answered:
            # Already answered (aiohttp is reading the rest away): nothing to tell.
            self.force_close()
            return
        body.set_exception(error)

    # --- heads ------------------------------------------------------------------------

    def _awaiting_head(self) -> bool:
        """Whether bytes arriving now belong to a request head: the last body is done."""
        body = self._body
        return body is None or body.is_eof()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self._loop.call_later(
            self._edge.options.head_timeout_s, self._head_deadline
        )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline(self) -> None:
        self._head_timer = None
        if self.transport is None or not self._awaiting_head():
            return
        if self._request_in_progress:
            # A response is still being written; the half-sent head after it gets
            # another period rather than a 408 in the middle of that response.
            self._arm_head_timer()
            return
        self._edge.timed_out("request_head")
        self._answer_and_close(head_timeout_error(self._edge.options.head_timeout_s))

    def _answer_and_close(self, error: ProxyError) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(raw_answer(error))
        self.force_close()
