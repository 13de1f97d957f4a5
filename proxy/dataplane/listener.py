"""Both listeners' HTTP server: aiohttp's, with an edge's limits on what clients send.

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

aiohttp offers no public hook between the bytes and the parser, so ``data_received``
reads three of ``RequestHandler``'s attributes (``_request_count``, ``_messages`` and
``_request_in_progress``);
the integration tests (tests/integration/test_edge_*.py) pin what this relies on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http import HttpProcessingError, RawRequestMessage
from aiohttp.web_protocol import RequestHandler

from proxy.core.edge_limits import (
    ConnectionAdmission,
    WarningLimiter,
    connection_refusal,
    head_timeout_error,
    malformed_error,
    malformed_reason,
)
from proxy.core.errors import ProxyError
from proxy.dataplane.relay import error_response

if TYPE_CHECKING:
    from aiohttp.streams import StreamReader

    from proxy.config.settings import Settings
    from proxy.telemetry.metrics import ProxyMetrics

logger = logging.getLogger(__name__)

# Anyone can send malformed requests: one warning per this long, however many come.
_WARN_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class EdgeOptions:
    """One listener's limits (see ListenConfig); ``name`` labels its metrics."""

    name: str
    head_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int
    max_connections_per_ip: int
    retry_after_s: int

    @classmethod
    def data_port(cls, settings: Settings) -> EdgeOptions:
        listen = settings.listen
        return cls(
            name="data",
            head_timeout_s=listen.request_head_timeout_s,
            keepalive_timeout_s=listen.keepalive_timeout_s,
            max_connections=listen.max_connections,
            max_connections_per_ip=listen.max_connections_per_ip,
            retry_after_s=settings.routing.retry_after_s,
        )

    @classmethod
    def admin_port(cls, settings: Settings) -> EdgeOptions:
        data = cls.data_port(settings)
        return cls(
            name="admin",
            head_timeout_s=data.head_timeout_s,
            keepalive_timeout_s=data.keepalive_timeout_s,
            max_connections=settings.admin.max_connections,
            max_connections_per_ip=0,
            retry_after_s=data.retry_after_s,
        )


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
        self._metrics = metrics
        self._loop_ = asyncio.get_running_loop()
        self._malformed_warnings = WarningLimiter(_WARN_EVERY_S, time.monotonic)
        self._error_logs = WarningLimiter(_WARN_EVERY_S, time.monotonic)
        # What aiohttp's Server would hand each RequestHandler (it keeps them private).
        self._protocol_kwargs = {
            k: v for k, v in kwargs.items() if k not in ("request_factory", "handler_cancellation")
        }

    def __call__(self) -> RequestHandler:
        return EdgeProtocol(self, loop=self._loop_, **self._protocol_kwargs)

    def refused(self, reason: str) -> None:
        self._metrics.client_connections_refused.labels(self.options.name, reason).inc()

    def timed_out(self, phase: str) -> None:
        self._metrics.client_timeouts.labels(self.options.name, phase).inc()

    def malformed(self, reason: str, peer: str | None) -> None:
        """Count a malformed request; warn, at most once per ``_WARN_EVERY_S``."""
        self._metrics.bad_http_requests.labels(self.options.name, reason).inc()
        held = self._malformed_warnings.allow()
        if held is not None:
            logger.warning(
                "malformed HTTP request on the %s port from %s (%s); answered 4xx and closed%s",
                self.options.name, peer or "?", reason,
                f"; {held} more since the last such warning" if held else "",
            )

    def unexpected(self, exc: BaseException | None) -> None:
        """A handler failed in a way nothing caught: log it, at most once per interval."""
        held = self._error_logs.allow()
        if held is not None:
            logger.error("unexpected error answering on the %s port (%d more since)",
                         self.options.name, held, exc_info=exc)

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


def raw_answer(error: ProxyError) -> bytes:
    """An answer written straight to the socket, outside any request: JSON, then close."""
    body = error.body()
    head = [f"HTTP/1.1 {error.status} {_reason(error.status)}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close"]
    head += [f"{name}: {value}" for name, value in error.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class EdgeProtocol(RequestHandler):
    """One client connection: aiohttp's protocol, with caps and the head deadline."""

    __slots__ = ("_admitted", "_answered", "_body", "_body_refused", "_edge", "_head_timer", "_ip")

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
        if not self._admitted or self._body_refused:
            return  # refused: its bytes are never parsed (nor what follows a refused body)
        # Bytes that arrive once the last body is complete, and complete no head, are
        # all head bytes: only those start the deadline. (A chunk that ends a body and
        # begins a head starts it with the next chunk, one read later.)
        in_head = self._awaiting_head()
        parsed = self._request_count
        super().data_received(data)
        if self.transport is None:
            return
        new = self._request_count - parsed
        if new:
            self._cancel_head_timer()
            for message, payload in list(self._messages)[-new:]:
                if isinstance(message, RawRequestMessage):
                    self._body = payload
                    continue
                body = self._body
                if body is not None and not body.is_eof():
                    # The parse error is in the body of the request being handled:
                    # aiohttp would leave its reads waiting for bytes that never come.
                    exc = getattr(message, "exc", None)
                    self._refuse_body(body, self._malformed(exc, in_body=True))
                self._body = None
        elif in_head and self._head_timer is None:
            self._arm_head_timer()

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
        if isinstance(exc, HttpProcessingError):
            error = self._malformed(exc, in_body=False)
        elif status == 504:
            error = ProxyError("pinproxy did not finish the request in time", status=504)
        else:
            self._edge.unexpected(exc)
            error = ProxyError("internal error in pinproxy")
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
