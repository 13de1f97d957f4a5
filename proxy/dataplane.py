"""The data-plane handler: every proxied request passes through ``DataPlane.handle``.

Theory of operation, in request order:
1. Read the body into memory when it is small enough (so it can be replayed and a
   session id read from it); otherwise stream it through untouched.
2. Extract the session id (pure) and look its pin up (local cache, else store).
3. Ask ``routing.choose`` (pure) with the registry's current snapshot. When nothing
   may take the request, wait for the registry to change until ``pin_wait_ms`` has
   passed since the request arrived, then answer 503.
4. A new session is pinned *before* anything is sent: pin-if-absent is atomic across
   replicas, and when another replica's pin won, the choice is made again among the
   winner's backends. So every answer a client ever receives matches the one pin.
5. Send upstream with ``X-Pinned-Version``. On the response head, read the version
   stamp; it is a fresh runtime report. If it disagrees with the pin, the response
   is dropped unseen and the request goes to the next backend of the pinned version,
   each at most once (nothing has reached the client yet: invariant 5).
6. Stream the body back chunk by chunk (relay.py); record the time to first byte.

A pin-store call that times out while the event loop itself ran late is this
process's overload, not the store's failure: it is answered ``proxy_overloaded``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, TypeVar

from proxy.errors import (
    BadRequest,
    NoBackends,
    Overloaded,
    ProxyError,
    StoreUnavailable,
    VersionUnavailable,
)
from proxy.events import Outcome
from proxy.headers import (
    ensure_traceparent,
    new_request_id,
    upstream_request_headers,
    valid_request_id,
)
from proxy.lost_pin import LostPinPolicy
from proxy.models import (
    STAMP_HEADERS,
    Dimension,
    Forward,
    InvalidVersion,
    Pin,
    RequestFacts,
    Unavailable,
    check_value,
)
from proxy.pin_token_http import PinTokenHeaders, changed_against_token
from proxy.relay import Served, error_response, relay
from proxy.request_body import RequestBody, read_body
from proxy.routing import RoutingPolicy, choose
from proxy.sessions import extract_session_id, needs_body
from proxy.upstream import Upstream, UpstreamConnectError
from proxy.usage import TapLimits

T = TypeVar("T")

if TYPE_CHECKING:
    import random
    from collections.abc import Awaitable, Mapping, Sequence

    from aiohttp import web

    from proxy.clock import Clock
    from proxy.config import Settings
    from proxy.events import RequestObserver
    from proxy.ewma import LoadTracker
    from proxy.loop_lag import LoopLagMonitor
    from proxy.metrics import ProxyMetrics
    from proxy.registry import Registry
    from proxy.store import PinStore

logger = logging.getLogger(__name__)

class DataPlane:
    """Handles proxied requests; every I/O dependency is passed in."""

    def __init__(
        self,
        *,
        settings: Settings,
        registry: Registry,
        store: PinStore,
        loads: LoadTracker,
        upstream: Upstream,
        metrics: ProxyMetrics,
        clock: Clock,
        rng: random.Random,
        observers: Sequence[RequestObserver] = (),
        loop_lag: LoopLagMonitor | None = None,
    ) -> None:
        self._settings = settings
        self._observers = tuple(observers)
        self._registry = registry
        self._store = store
        self._loads = loads
        self._upstream = upstream
        self._metrics = metrics
        self._clock = clock
        self._rng = rng
        self._loop_lag = loop_lag
        self._store_timeout_s = settings.store.op_timeout_ms / 1000
        self._policy = RoutingPolicy.from_config(settings.routing, settings.versions)
        self._sources = settings.sessions.sources
        self._read_body_for_session = needs_body(self._sources)
        self._pin_wait_s = settings.routing.pin_wait_ms / 1000.0
        self._lost_pin = LostPinPolicy(settings.sessions, metrics, settings.routing.retry_after_s)
        tokens = settings.sessions.pin_token
        self._tokens = None if tokens is None else PinTokenHeaders(tokens, metrics)
        # Usage and JSON validity are read off responses only for someone to observe.
        self._tap_limits = TapLimits() if self._observers else None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        arrived_at = self._clock.time()
        arrived = self._clock.monotonic()
        incoming = request.headers.get("X-Request-ID")
        request_id = incoming if valid_request_id(incoming) else new_request_id(self._rng)
        assert request_id is not None
        traceparent = ensure_traceparent(request.headers.get("traceparent"), self._rng)
        outcome = Outcome()
        try:
            return await self._proxy(request, request_id, traceparent, arrived, outcome)
        except ProxyError as exc:
            if isinstance(exc, VersionUnavailable):
                self._metrics.unavailable.labels(exc.version_key).inc()
                outcome.version_key = exc.version_key
            outcome.status, outcome.error_type = exc.status, exc.error_type
            return error_response(exc, request_id)
        finally:
            if self._observers:
                self._emit(request, request_id, traceparent, arrived_at, arrived, outcome)

    def _emit(
        self,
        request: web.BaseRequest,
        request_id: str,
        traceparent: str,
        arrived_at: float,
        arrived: float,
        outcome: Outcome,
    ) -> None:
        event = outcome.event(
            at=arrived_at,
            request_id=request_id,
            traceparent=traceparent,
            incoming_traceparent=request.headers.get("traceparent"),
            method=request.method,
            path=request.rel_url.path,
            duration_s=self._clock.monotonic() - arrived,
        )
        for observer in self._observers:
            try:
                observer.observe(event)
            except Exception:
                # An observer bug must never turn a served answer into an error.
                logger.exception("request observer %r failed", observer)

    async def _proxy(
        self,
        request: web.BaseRequest,
        request_id: str,
        traceparent: str,
        arrived: float,
        outcome: Outcome,
    ) -> web.StreamResponse:
        body = await read_body(request, self._settings.upstream.max_buffered_body_bytes)
        session_id = extract_session_id(
            self._sources,
            request.headers,
            request.cookies,
            body.data if self._read_body_for_session else None,
            max_bytes=self._settings.sessions.max_id_bytes,
        )
        if session_id is None and self._settings.sessions.required:
            raise BadRequest(
                "a session id is required (see the configured session sources)",
                code="missing_session_id",
            )
        outcome.session_id = session_id
        outcome.request_body = body.data
        pinning = self._settings.routing.pinning and session_id is not None
        pin = None
        lost_pin = False
        token = None
        if pinning and session_id:
            if self._tokens is not None:
                token = self._tokens.read(
                    request.headers, request.cookies, session_id, self._clock.time()
                )
            with self._metrics.time_store("get"):
                found = await self._stored(
                    self._store.lookup(session_id, token.pin if token else None)
                )
            pin = found.pin
            if pin is None:
                # An expired token is genuine proof the conversation began before.
                expired = token is not None and token.result == "expired"
                lost_pin = self._lost_pin.check(found, body.data, expired)
            elif found.changed_from is not None:
                outcome.version_changed = f"{found.changed_from} -> {pin.version_key}"
            else:
                outcome.version_changed = changed_against_token(token, pin)

        served = await self._route_and_send(
            request, request_id, traceparent, body, session_id if pinning else None, pin,
            arrived, outcome, lost_pin=lost_pin,
        )
        if self._tokens is not None and session_id and pinning and outcome.version_key:
            served_pin = Pin(outcome.version_key, outcome.backend_id or "", outcome.region or "",
                             pin.pinned_at if pin is not None else self._clock.time())
            outcome.extra_headers = self._tokens.answer_headers(
                session_id, served_pin, token, self._clock.time()
            )
        return await relay(
            request, request_id, served, outcome, loads=self._loads, tap_limits=self._tap_limits
        )

    async def _route_and_send(
        self,
        request: web.BaseRequest,
        request_id: str,
        traceparent: str,
        body: RequestBody,
        session_id: str | None,
        pin: Pin | None,
        arrived: float,
        outcome: Outcome,
        *,
        lost_pin: bool = False,
    ) -> Served:
        deadline = arrived + self._pin_wait_s
        exclude: set[str] = set()
        connect_retries = 1 if body.replayable else 0
        while True:
            decision = choose(
                RequestFacts(session_id=session_id, exclude=frozenset(exclude)),
                pin,
                self._registry.snapshot,
                self._policy,
                self._loads,
                self._rng,
                self._clock.time(),
            )
            if isinstance(decision, Unavailable):
                remaining = deadline - self._clock.monotonic()
                if remaining > 0:
                    await self._registry.wait_for_change(remaining)
                    continue
                raise self._unavailable(decision)

            if session_id is not None and decision.new_pin:
                ours = Pin(
                    decision.version_key,
                    decision.backend.id,
                    decision.backend.region,
                    self._clock.time(),
                )
                with self._metrics.time_store("pin_if_absent"):
                    pin = await self._stored(self._store.pin_if_absent(session_id, ours))
                if lost_pin:
                    outcome.version_changed = self._lost_pin.marked(pin.version_key, pin == ours)
                if pin == ours:
                    outcome.new_pin = True
                    self._metrics.pins_created.labels(ours.version_key).inc()
                elif pin.version_key != ours.version_key:
                    # Another replica pinned this session first: its version holds.
                    self._metrics.pin_races_lost.inc()
                    continue
            elif session_id is not None and decision.repin_from is not None:
                pin = Pin(
                    decision.version_key,
                    decision.backend.id,
                    decision.backend.region,
                    self._clock.time(),
                )
                with self._metrics.time_store("repin"):
                    await self._stored(self._store.repin(session_id, pin))
                outcome.version_changed = f"{decision.repin_from} -> {decision.version_key}"
                self._metrics.version_switches.labels(
                    "retired", decision.repin_from, decision.version_key
                ).inc()
                logger.warning("session repinned: version %s retired", decision.repin_from)

            try:
                served = await self._send(
                    request, request_id, traceparent, body, decision, pinned=session_id is not None
                )
            except UpstreamConnectError:
                if connect_retries == 0:
                    raise
                connect_retries -= 1
                exclude.add(decision.backend.id)
                self._metrics.upstream_retries.labels("connect").inc()
                continue

            if session_id is None or served.served_key == decision.version_key:
                outcome.backend_id = decision.backend.id
                outcome.region = decision.backend.region
                outcome.version_key = served.served_key
                outcome.ttfb_s = served.ttfb_s
                return served
            # Mismatch guard: the backend flipped since we last heard from it.
            served.response.close()
            self._loads.finish(decision.backend.id, served.ttfb_s)
            self._metrics.mismatch_guard.labels(
                decision.backend.id, decision.version_key, served.served_key
            ).inc()
            logger.warning(
                "backend %s answered with version %s for a session pinned to %s; withheld",
                decision.backend.id,
                served.served_key,
                decision.version_key,
            )
            exclude.add(decision.backend.id)
            if not body.replayable:
                raise VersionUnavailable(decision.version_key, self._settings.routing.retry_after_s)
            # Each mismatch removes a backend that really runs another version and nothing
            # has reached the client, so the next backend of the pinned version is always
            # worth asking: a region that cuts over as a whole flips all its replicas at
            # once. The exclusion set tries each backend once, which bounds the loop.
            self._metrics.upstream_retries.labels("version_mismatch").inc()

    async def _send(
        self,
        request: web.BaseRequest,
        request_id: str,
        traceparent: str,
        body: RequestBody,
        forward: Forward,
        *,
        pinned: bool,
    ) -> Served:
        backend = forward.backend
        headers = upstream_request_headers(
            request.headers,
            client_ip=request.remote,
            proto=self._client_proto(request),
            request_id=request_id,
            traceparent=traceparent,
            pinned_version=forward.version_key if pinned else None,
        )
        if body.data is None and body.content_length is not None:
            # A streamed body keeps its declared length rather than turning chunked.
            headers["Content-Length"] = str(body.content_length)
        payload = body.data if body.data is not None else body.stream
        self._loads.start(backend.id)
        started = self._clock.monotonic()
        try:
            response = await self._upstream.send(
                request.method, backend.backend.url, request.rel_url.raw_path_qs, headers, payload
            )
        except UpstreamConnectError as exc:
            self._loads.finish(backend.id, None)
            self._registry.report_failure(backend.id, exc.message)
            raise
        except ProxyError:
            self._loads.finish(backend.id, None)
            raise
        except BaseException:
            # Cancelled (the client hung up): not the backend's fault, so no penalty.
            self._loads.abandon(backend.id)
            raise
        ttfb = self._clock.monotonic() - started
        self._registry.report_success(backend.id)
        served_key = self._apply_stamp(backend.id, response.headers) or forward.version_key
        return Served(response, forward, served_key, ttfb)

    async def _stored(self, operation: Awaitable[T]) -> T:
        """A pin-store call, its timeout told apart from a store failure.

        A call times out when its answer is not processed in time, and a saturated
        proxy delays that as surely as a frozen store: requests queue for the store's
        pooled connections and for the event loop. When other calls succeeded while
        this one waited, or the loop itself ran late by half the timeout or more, the
        time went here: the request is refused as ``Overloaded`` (and not counted as a
        store error), so neither the client nor the pin-store alert blames a store
        that is fine.
        """
        started = self._clock.monotonic()
        try:
            return await operation
        except StoreUnavailable as exc:
            exc.headers["Retry-After"] = str(self._settings.routing.retry_after_s)
            lag = self._loop_lag
            if exc.timed_out and (exc.store_answering or (
                lag is not None and lag.worst_since(started) >= self._store_timeout_s / 2
            )):
                self._metrics.overloaded.inc()
                raise Overloaded(self._settings.routing.retry_after_s) from exc
            raise

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

    def _client_proto(self, request: web.BaseRequest) -> str:
        if self._settings.listen.trust_forwarded_headers:
            forwarded = request.headers.get("X-Forwarded-Proto")
            if forwarded in ("http", "https"):
                return forwarded
        return request.scheme

    def _unavailable(self, decision: Unavailable) -> ProxyError:
        retry_after = self._settings.routing.retry_after_s
        if decision.version_key is not None:
            return VersionUnavailable(decision.version_key, retry_after)
        return NoBackends(retry_after)

    def __repr__(self) -> str:
        return f"DataPlane(pinning={self._settings.routing.pinning}, registry={self._registry!r})"
