"""Relaying a backend's answer to the client, and the OpenAI-shaped error answer."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.core.errors import UpstreamBodyError
from proxy.core.headers import client_response_headers
from proxy.core.models import prompt_of
from proxy.telemetry.usage import new_tap

if TYPE_CHECKING:
    from proxy.core.errors import ProxyError
    from proxy.core.events import Outcome
    from proxy.core.ewma import LoadTracker
    from proxy.core.models import Forward
    from proxy.dataplane.exchange import Exchange
    from proxy.telemetry.usage import ResponseTap, TapLimits
    from proxy.upstream.client import UpstreamResponse

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Served:
    """A backend's response whose head is in, with where and on what version it ran."""

    response: UpstreamResponse
    forward: Forward
    served_key: str
    ttfb_s: float
    failed: bool = False  # a 5xx: the load estimate takes it as a failure, not as fast


async def relay(
    exchange: Exchange,
    request_id: str,
    served: Served,
    outcome: Outcome,
    *,
    loads: LoadTracker,
    tap_limits: TapLimits | None,
) -> None:
    """Write the backend's answer to the client: head, then the body as it arrives.

    Usage and JSON validity are read off the body after each write (never delaying a
    byte) when ``tap_limits`` is given. A backend failing mid-body drops the client's
    connection: ending the response cleanly would pass a truncated answer off as
    complete.
    """
    upstream = served.response
    backend = served.forward.backend
    headers = client_response_headers(upstream.headers)
    headers["X-Prompt-Version"] = prompt_of(served.served_key)
    headers["X-Served-By"] = backend.id
    headers["X-Served-Region"] = backend.region
    headers["X-Request-ID"] = request_id
    if outcome.version_changed is not None:
        headers["X-Prompt-Version-Changed"] = outcome.version_changed
    if outcome.extra_headers:
        for name, value in outcome.extra_headers:
            headers.add(name, value)
    outcome.streamed = upstream.content_type == "text/event-stream"
    # An answer that is already all here (most non-streamed ones) goes out in one
    # write, head and body together.
    whole = upstream.whole_body()
    tap = None
    if tap_limits is not None:
        tap = new_tap(
            upstream.status,
            upstream.content_type,
            upstream.headers.get("Content-Encoding"),
            outcome.request_body,
            tap_limits,
        )
    completed = False
    try:
        if whole is not None:
            await exchange.respond(upstream.status, headers.items(), whole, upstream.reason)
            outcome.status = upstream.status  # the status sent, whatever befalls the body
            if tap is not None:
                tap.feed(whole)
        else:
            await exchange.start(upstream.status, headers.items(), upstream.reason)
            outcome.status = upstream.status
            await _stream(exchange, upstream, tap)
            await exchange.finish()
        completed = True
        if tap is not None:
            found = tap.finish()
            outcome.usage = found.usage
            outcome.structured_output_valid = found.structured_output_valid
            outcome.response_model = found.model
    except UpstreamBodyError as exc:
        # The backend broke mid-body. Ending the response cleanly would pass a
        # truncated answer off as complete; dropping the connection tells the truth.
        logger.warning("backend %s failed mid-response: %r", backend.id, exc)
        outcome.error_type = exc.error_type
        exchange.abort()
    except ConnectionResetError:
        logger.debug("client went away mid-response (request %s)", request_id)
        outcome.status = 499  # nginx's "client closed request": nobody read the answer
    except asyncio.CancelledError:
        outcome.status = 499  # the client hung up (with handler cancellation on)
        raise
    finally:
        if completed:
            upstream.release()
        else:
            upstream.close()
        loads.finish(backend.id, None if served.failed else served.ttfb_s)


async def _stream(exchange: Exchange, upstream: UpstreamResponse, tap: ResponseTap | None) -> None:
    """Relay the body as it arrives, with no coroutine and no task wake per piece.

    While the relay waits, the upstream client hands each piece straight to
    ``forward`` (``stream_to``), which writes it and feeds the tap; the relay's task
    wakes only at the end, on an error, or when the client's socket is full (then it
    waits for the drain, the backend's bytes buffering meanwhile and their read pausing
    past the high-water mark). What was buffered meanwhile goes out in one write.
    """
    take, arrival, sink = upstream.take_chunk, upstream.arrival, upstream.stream_to
    send = exchange.write_nowait
    paused = False

    def forward(piece: bytes) -> bool:
        nonlocal paused
        paused = send(piece)
        if tap is not None:
            tap.feed(piece)  # after the write: reading never delays a byte
        return not paused

    while True:
        chunk = take()
        if chunk is None:
            sink(forward)
            try:
                await arrival()
            finally:
                sink(None)
            if paused:
                paused = False
                await exchange.drain()  # a slow client: the backend's read pauses meanwhile
            continue
        if not chunk:
            return
        if send(chunk):
            await exchange.drain()
        if tap is not None:
            tap.feed(chunk)


async def respond_error(
    exchange: Exchange, exc: ProxyError, request_id: str | None = None
) -> None:
    """Answer with the OpenAI-shaped JSON body of any ProxyError."""
    headers = [("Content-Type", "application/json"), *exc.headers.items()]
    if request_id is not None:
        headers.append(("X-Request-ID", request_id))
    await exchange.respond(exc.status, headers, exc.body())


def error_response(exc: ProxyError, request_id: str | None = None) -> web.Response:
    """The OpenAI-shaped JSON answer for any ProxyError, as aiohttp's response (the
    admin listener's)."""
    headers = dict(exc.headers)
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    return web.Response(
        status=exc.status, body=exc.body(), content_type="application/json", headers=headers
    )
