"""One send to a backend: the upstream request built, sent, and its version stamp read.

Theory of operation. The lifecycle (proxy/policy/lifecycle.py) decides where a request
goes (``Send``); ``Forwarder.send`` carries that out. The upstream head is the
client's, cleaned of hop-by-hop and forwarding headers and given ours
(core/headers.py: X-Forwarded-*, X-Request-ID, traceparent, ``X-Pinned-Version``);
a streamed body keeps its declared length rather than turning chunked. The load
tracker sees the send start and end (a failure of the backend's finishes it, a
client gone or a body refused mid-stream only abandons it: not the backend's
fault). On the response head, the version stamp is a fresh runtime report, applied
to the registry before the lifecycle sees the head, so nothing has reached the
client yet (invariant 5); the served version is the stamp's, else the chosen one's.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from proxy.core.errors import UpstreamError
from proxy.core.headers import upstream_request_headers
from proxy.core.models import STAMP_HEADERS, Dimension, InvalidVersion, check_value
from proxy.dataplane.relay import Served

if TYPE_CHECKING:
    from collections.abc import Mapping

    from proxy.core.clock import Clock
    from proxy.core.ewma import LoadTracker
    from proxy.core.forwarded import Forwarding
    from proxy.dataplane.exchange import Exchange
    from proxy.dataplane.request_body import RequestBody
    from proxy.fleet.registry import Registry
    from proxy.policy.lifecycle_messages import Send
    from proxy.upstream.client import Upstream

# The data plane's logger: these warnings are the data plane's, as before the split.
logger = logging.getLogger("proxy.dataplane.plane")


class Forwarder:
    """Sends a request where the lifecycle chose; every I/O dependency is passed in."""

    __slots__ = ("_clock", "_loads", "_registry", "_upstream")

    def __init__(
        self, *, registry: Registry, loads: LoadTracker, upstream: Upstream, clock: Clock
    ) -> None:
        self._registry = registry
        self._loads = loads
        self._upstream = upstream
        self._clock = clock

    async def send(
        self,
        request: Exchange,
        request_id: str,
        traceparent: str,
        body: RequestBody,
        action: Send,
        forwarding: Forwarding,
    ) -> Served:
        """Send ``request`` as ``action`` says; the response head, with what it served.

        Raises the upstream client's errors (UpstreamError and subclasses) as they came.
        """
        forward = action.forward
        backend = forward.backend
        headers = upstream_request_headers(
            request.headers,
            forwarding=forwarding,
            request_id=request_id,
            traceparent=traceparent,
            pinned_version=action.pinned_version,
        )
        if body.data is None and body.content_length is not None:
            # A streamed body keeps its declared length rather than turning chunked.
            headers["Content-Length"] = str(body.content_length)
        payload = body.data if body.data is not None else body.stream
        self._loads.start(backend.id)
        started = self._clock.monotonic()
        try:
            response = await self._upstream.send(
                request.method, backend.backend.url, request.raw_path_qs, headers,
                payload, replayable=action.replayable,
            )
        except UpstreamError:
            self._loads.finish(backend.id, None)
            raise
        except BaseException:
            # The client hung up, or its body was refused mid-stream (the edge's
            # ProxyError): not the backend's fault, so no penalty.
            self._loads.abandon(backend.id)
            raise
        ttfb = self._clock.monotonic() - started
        served_key = self._apply_stamp(backend.id, response.headers) or forward.version_key
        return Served(response, forward, served_key, ttfb)

    def _apply_stamp(self, backend_id: str, headers: Mapping[str, str]) -> str | None:
        stamp: dict[Dimension, str] = {}
        try:
            for dim, header in STAMP_HEADERS.items():
                value = headers.get(header)
                if value is not None:
                    stamp[dim] = check_value(dim, value.strip())
        except InvalidVersion as exc:
            logger.warning("backend %s sent an unusable version stamp: %s", backend_id, exc)
            return None
        if not stamp:
            return None
        return self._registry.report_stamp(backend_id, stamp)

    def __repr__(self) -> str:
        return f"Forwarder(registry={self._registry!r})"
