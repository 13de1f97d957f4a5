"""The data-plane handler: every proxied request passes through ``DataPlane.handle``.

Theory of operation, in request order:
1. Read the body and the session id together (request_body.SessionBodyReader): a
   small body is held (replayable); a larger one streams, after as much of it as a
   body session source needs to settle the id (never an unpinned guess).
2. Run the request's lifecycle: every decision from the pin lookup to the response
   head to relay (pin-if-absent before anything is sent, pin races, retirement
   repins, the mismatch guard, refusals, failed connections, replays, pin-wait) is
   made by the pure state machine in lifecycle.py; ``_route_and_send`` only executes
   its actions (store calls, sends, waits) and effects (counters, passive health),
   and translates each send's result into an event, in one place (``_attempt``).
3. Send upstream with ``X-Pinned-Version``. On the response head, read the version
   stamp: it is a fresh runtime report, applied to the registry before the machine
   sees the head (nothing has reached the client yet: invariant 5).
4. Stream the body back chunk by chunk (relay.py); record the time to first byte.

A pin-store call that times out while the event loop itself ran late is this
process's overload, not the store's failure: it is answered ``proxy_overloaded``
(counted as a shed, reason ``store_timeout``). It is the backstop of admission control
(admission_gate.py), which refuses at the door, before this handler runs, what the
process cannot take on; a refusal it decided comes in as ``handle``'s ``refusal``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, TypeVar

from proxy.core.continuation import continues_conversation
from proxy.core.errors import (
    Overloaded,
    ProxyError,
    StoreUnavailable,
    UpstreamConnectError,
    UpstreamDropped,
    UpstreamError,
    UpstreamTimeout,
    VersionUnavailable,
)
from proxy.core.events import Outcome
from proxy.core.forwarded import Forwarding, TrustedProxies, forwarding
from proxy.core.headers import (
    ensure_traceparent,
    forwarding_headers,
    new_request_id,
    parse_traceparent,
    upstream_request_headers,
    valid_request_id,
)
from proxy.core.models import STAMP_HEADERS, Dimension, InvalidVersion, Pin, check_value
from proxy.dataplane.boundary import ErrorBoundary
from proxy.dataplane.live_policy import LivePolicies
from proxy.dataplane.pin_token_http import PinTokenHeaders, changed_against_token
from proxy.dataplane.relay import Served, relay, respond_error
from proxy.dataplane.request_body import RequestBody
from proxy.policy.lifecycle import (
    CountMismatch,
    CountNewPin,
    CountRaceLost,
    CountRefusal,
    CountRetry,
    Discard,
    Effect,
    Event,
    Fail,
    HeadReceived,
    Lifecycle,
    LookUpPin,
    MarkSuspect,
    PinIfAbsent,
    PinLooked,
    PinStored,
    Relay,
    Repin,
    Repinned,
    ReportResult,
    Reprobe,
    RetryBudget,
    Send,
    SendFailed,
    Waited,
    WaitForRegistry,
    World,
)
from proxy.telemetry.usage import TapLimits

T = TypeVar("T")

if TYPE_CHECKING:
    import random
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from proxy.config.settings import Settings
    from proxy.core.clock import Clock
    from proxy.core.events import RequestObserver
    from proxy.core.ewma import LoadTracker
    from proxy.dataplane.exchange import Exchange
    from proxy.dataplane.request_body import RequestBody
    from proxy.fleet.registry import Registry
    from proxy.policy.pin_token import TokenCheck
    from proxy.policy.routing import RoutingPolicy
    from proxy.store import Lookup, PinStore
    from proxy.telemetry.loop_lag import LoopLagMonitor
    from proxy.telemetry.metrics import ProxyMetrics
    from proxy.upstream.client import Upstream

logger = logging.getLogger(__name__)

# RFC 9110 §9.2.2: a request written once may be written again (after a dropped
# connection) only with one of these methods, or with an Idempotency-Key.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

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
        probe: Callable[[str], None] = lambda backend_id: None,
        trace: Callable[[str | None, str], str] | None = None,
        boundary: ErrorBoundary | None = None,
    ) -> None:
        """``probe`` polls one backend's ``/version`` out of turn (Discovery.probe).
        ``trace`` makes the ``traceparent`` sent upstream from the client's and the
        method (TracingObserver.upstream_traceparent); without it a valid client
        ``traceparent`` passes as it came, and a new trace is not sampled.
        ``boundary``: the data port's error boundary (one of its own if not given)."""
        self._settings = settings
        self._boundary = boundary or ErrorBoundary("data")
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
        self._live = live = LivePolicies.from_settings(settings, metrics)
        self._budget = RetryBudget(live.retry_budget_percent, live.min_retry_concurrency)
        tokens = settings.sessions.pin_token
        self._tokens = None if tokens is None else PinTokenHeaders(tokens, metrics)
        self._probe = probe
        self._trace = trace
        self._trusted = TrustedProxies(settings.listen.trusted_proxies)
        # Usage and JSON validity are read off responses only for someone to observe.
        self._tap_limits = TapLimits() if self._observers else None

    @property
    def boundary(self) -> ErrorBoundary:
        """The data port's error boundary (its front door answers through it too)."""
        return self._boundary

    @property
    def routing_policy(self) -> RoutingPolicy:
        """The routing policy new requests are decided by (the admin API's repins too)."""
        return self._live.routing

    def reconfigure(self, settings: Settings) -> None:
        """Swap in the policies of reloaded ``settings`` (see proxy/dataplane/live_policy.py).

        Built whole before the one assignment that publishes them, so a request reads
        either the old policies or the new ones; requests in flight keep theirs.
        """
        live = LivePolicies.from_settings(settings, self._metrics)
        self._budget.reconfigure(live.retry_budget_percent, live.min_retry_concurrency)
        self._live = live

    async def handle(self, request: Exchange, refusal: ProxyError | None = None) -> None:
        """Answer ``request`` (proxied, or refused with a JSON error), and record it; given
        a ``refusal`` (admission shed it), answer that without reading the body or
        routing, recorded like any other answer."""
        arrived_at = self._clock.time()
        arrived = self._clock.monotonic()
        incoming = request.headers.get("X-Request-ID")
        request_id = incoming if valid_request_id(incoming) else new_request_id(self._rng)
        assert request_id is not None
        incoming_trace = request.headers.get("traceparent")
        if parse_traceparent(incoming_trace) is None:
            incoming_trace = None
        traceparent = (
            ensure_traceparent(incoming_trace, self._rng)
            if self._trace is None
            else self._trace(incoming_trace, request.method)
        )
        forwarding = self._forwarding(request)
        outcome = Outcome(client=forwarding.client)
        # Read on arrival, like every live policy: a reload under way does not re-mark it.
        eval_header = self._live.eval_header
        eval_run = eval_header is not None and eval_header in request.headers
        self._budget.active += 1
        try:
            if refusal is not None:
                raise refusal
            await self._proxy(
                request, request_id, traceparent, arrived, outcome, forwarding
            )
        except Exception as exc:
            # The data plane's error boundary: everything is answered, and recorded
            # as what was answered (a bug as 500, not as the 499 of a client gone).
            error = self._boundary.error_for(exc, request)
            if isinstance(error, VersionUnavailable):
                self._metrics.unavailable.labels(error.version_key).inc()
                outcome.version_key = error.version_key
            outcome.error_type = error.error_type
            if request.response_started:
                # The head is out (its status recorded by relay): the answer can
                # only be cut off, which tells the client it is incomplete.
                request.abort()
                return
            outcome.status = error.status
            await respond_error(request, error, request_id)
        finally:
            self._budget.active -= 1
            if self._observers:
                self._emit(request, request_id, (incoming_trace, traceparent), arrived_at,
                           arrived, outcome, eval_run)

    def _emit(
        self,
        request: Exchange,
        request_id: str,
        traces: tuple[str | None, str],
        arrived_at: float,
        arrived: float,
        outcome: Outcome,
        eval_run: bool,
    ) -> None:
        event = outcome.event(
            at=arrived_at,
            request_id=request_id,
            traceparent=traces[1],
            incoming_traceparent=traces[0],
            method=request.method,
            path=request.path,
            duration_s=self._clock.monotonic() - arrived,
            eval_run=eval_run,
        )
        for observer in self._observers:
            try:
                observer.observe(event)
            except Exception as exc:
                # An observer bug must never turn a served answer into an error.
                self._boundary.observer_failed(exc, observer)

    async def _proxy(
        self,
        request: Exchange,
        request_id: str,
        traceparent: str,
        arrived: float,
        outcome: Outcome,
        forwarding: Forwarding,
    ) -> None:
        live = self._live  # this request's policies, to its end (see reconfigure)
        body, session_id = await live.body_reader.read(request)
        outcome.session_id = session_id
        outcome.request_body = body.data
        pinning = live.pinning and session_id is not None
        token = None
        if pinning and session_id and self._tokens is not None:
            token = self._tokens.read(
                request.headers, request.cookies, session_id, self._clock.time()
            )
        served = await self._route_and_send(
            request, request_id, traceparent, body, session_id if pinning else None,
            arrived, outcome, live, token=token, forwarding=forwarding,
        )
        if self._tokens is not None and pinning and session_id and outcome.version_key:
            served_pin = Pin(outcome.version_key, outcome.backend_id or "", outcome.region or "",
                             self._clock.time())
            outcome.extra_headers = self._tokens.answer_headers(
                session_id, served_pin, token, self._clock.time()
            )
        await relay(
            request, request_id, served, outcome, loads=self._loads, tap_limits=self._tap_limits
        )

    async def _route_and_send(
        self,
        request: Exchange,
        request_id: str,
        traceparent: str,
        body: RequestBody,
        session_id: str | None,
        arrived: float,
        outcome: Outcome,
        live: LivePolicies,
        *,
        token: TokenCheck | None = None,
        forwarding: Forwarding,
    ) -> Served:
        """Run the request's lifecycle (proxy/policy/lifecycle.py): execute its actions, feed
        their results back, apply its effects; return the response to relay.

        ``token``: the request's checked pin token, if it had one."""
        machine = Lifecycle(
            policy=live.lifecycle,
            session_id=session_id,
            held=body.replayable,
            idempotent=request.method in _IDEMPOTENT or "Idempotency-Key" in request.headers,
            arrived=arrived,
            loads=self._loads,
            rng=self._rng,
        )
        budget = self._budget
        retrying = False
        served: Served | None = None
        mark: str | None = None  # what the pin lookup says the answer must carry
        lost_pin = False
        step = machine.start(self._world())
        try:
            while True:
                for effect in step.effects:
                    if isinstance(effect, CountRetry) and effect.budgeted and not retrying:
                        retrying = True
                        budget.retrying += 1
                    self._apply(effect, served, outcome)
                action = step.action
                event: Event
                if isinstance(action, Relay):
                    assert served is not None
                    served.failed = action.failed
                    backend = action.forward.backend
                    outcome.backend_id, outcome.region = backend.id, backend.region
                    outcome.version_key, outcome.ttfb_s = served.served_key, served.ttfb_s
                    if lost_pin:
                        mark = live.lost_pin.marked(served.served_key, outcome.new_pin)
                    outcome.version_changed = machine.version_changed or mark
                    return served
                if isinstance(action, Fail):
                    outcome.version_changed = machine.version_changed
                    if machine.pinned_version is not None:
                        outcome.version_key = machine.pinned_version
                    raise action.error
                if isinstance(action, LookUpPin):
                    hint = token.pin if token is not None else None
                    propose = None if hint is not None else self._proposal(machine, body, token)
                    with self._metrics.time_store("get"):
                        found = await self._stored(
                            self._store.lookup(action.session_id, hint, propose), live
                        )
                    mark, lost_pin = self._pin_found(found, body, token, live)  # or PinLost
                    event = PinLooked(found.pin, found.created)
                elif isinstance(action, PinIfAbsent):
                    with self._metrics.time_store("pin_if_absent"):
                        stored = await self._stored(
                            self._store.pin_if_absent(action.session_id, action.pin), live
                        )
                    event = PinStored(stored)
                elif isinstance(action, Repin):
                    with self._metrics.time_store("repin"):
                        await self._stored(
                            self._store.repin(action.session_id, action.pin), live
                        )
                    event = Repinned()
                elif isinstance(action, WaitForRegistry):
                    remaining = action.until - self._clock.monotonic()
                    if remaining > 0:
                        await self._registry.wait_for_change(remaining)
                    event = Waited()
                else:
                    served = None
                    event, served = await self._attempt(
                        request, request_id, traceparent, body, action, forwarding
                    )
                step = machine.step(event, self._world())
        finally:
            if retrying:
                budget.retrying -= 1

    def _proposal(
        self, machine: Lifecycle, body: RequestBody, token: TokenCheck | None
    ) -> Callable[[], Pin | None]:
        """The new-session pin a store may write with its lookup (one round trip).

        Only for what would be an ordinary new session if no pin is found: a continuing
        conversation (or an expired token) without a pin is a lost pin, whose rules
        need the lookup's answer first (proxy/dataplane/lost_pin.py).
        """

        def propose() -> Pin | None:
            if token is not None and token.result == "expired":
                return None
            if continues_conversation(body.data):
                return None
            return machine.propose(self._world())

        return propose

    def _pin_found(
        self, found: Lookup, body: RequestBody, token: TokenCheck | None, live: LivePolicies
    ) -> tuple[str | None, bool]:
        """(the answer's X-Prompt-Version-Changed, whether the pin was lost) for a lookup.

        No pin for a continuing conversation is a lost pin (proxy/dataplane/lost_pin.py: refused
        with ``PinLost``, or pinned afresh and marked); a pin a re-assertion conflict
        changed, or one other than a valid token's, is marked ``old -> new``.
        """
        pin = found.pin
        if pin is None:
            # An expired token is genuine proof the conversation began before.
            expired = token is not None and token.result == "expired"
            return None, live.lost_pin.check(found, body.data, expired)
        if found.changed_from is not None:
            return f"{found.changed_from} -> {pin.version_key}", False
        return changed_against_token(token, pin), False

    async def _attempt(
        self,
        request: Exchange,
        request_id: str,
        traceparent: str,
        body: RequestBody,
        action: Send,
        forwarding: Forwarding,
    ) -> tuple[Event, Served | None]:
        """One send, its outcome as a lifecycle event (the one error translation)."""
        try:
            served = await self._send(request, request_id, traceparent, body, action, forwarding)
        except UpstreamConnectError as exc:
            return SendFailed("connect", exc.message), None
        except UpstreamDropped as exc:
            return SendFailed("dropped", exc.message, reused=exc.reused), None
        except UpstreamTimeout as exc:
            return SendFailed("timeout", exc.message), None
        except UpstreamError as exc:
            return SendFailed("invalid", exc.message, code=exc.code), None
        return HeadReceived(served.response.status, served.served_key), served

    def _apply(self, effect: Effect, served: Served | None, outcome: Outcome) -> None:
        """Carry out one of the lifecycle's synchronous effects."""
        metrics = self._metrics
        if isinstance(effect, ReportResult):
            self._registry.report_result(effect.backend_id, effect.ok)
        elif isinstance(effect, Discard):
            assert served is not None
            served.response.close()
            self._loads.finish(effect.backend_id, served.ttfb_s)
        elif isinstance(effect, MarkSuspect):
            logger.warning("backend %s is suspect: %s", effect.backend_id, effect.why)
            self._registry.mark_suspect(effect.backend_id, effect.why)
            self._probe(effect.backend_id)
        elif isinstance(effect, Reprobe):
            self._probe(effect.backend_id)
        elif isinstance(effect, CountRetry):
            metrics.upstream_retries.labels(effect.reason).inc()
        elif isinstance(effect, CountMismatch):
            metrics.mismatch_guard.labels(effect.backend_id, effect.pinned, effect.served).inc()
            logger.warning(
                "backend %s answered with version %s for a session pinned to %s; withheld",
                effect.backend_id, effect.served, effect.pinned,
            )
        elif isinstance(effect, CountRefusal):
            metrics.refusals.labels(effect.backend_id, effect.pinned).inc()
            logger.warning(
                "backend %s refused a request pinned to %s; withheld, its version re-polled",
                effect.backend_id, effect.pinned,
            )
        elif isinstance(effect, CountRaceLost):
            metrics.pin_races_lost.inc()
        elif isinstance(effect, CountNewPin):
            outcome.new_pin = True
            metrics.pins_created_for(effect.version_key).inc()
        else:
            metrics.version_switches.labels(effect.reason, effect.from_key, effect.to_key).inc()
            logger.warning("session repinned from %s to %s (%s)", effect.from_key,
                           effect.to_key, effect.reason)

    def _world(self) -> World:
        return World(
            self._registry.snapshot,
            self._clock.time(),
            self._clock.monotonic(),
            self._budget.has_room(),
        )

    async def _send(
        self,
        request: Exchange,
        request_id: str,
        traceparent: str,
        body: RequestBody,
        action: Send,
        forwarding: Forwarding,
    ) -> Served:
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

    async def _stored(self, operation: Awaitable[T], live: LivePolicies) -> T:
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
            exc.headers["Retry-After"] = str(live.retry_after_s)
            lag = self._loop_lag
            if exc.timed_out and (exc.store_answering or (
                lag is not None and lag.worst_since(started) >= self._store_timeout_s / 2
            )):
                self._metrics.overloaded.inc()
                self._metrics.shed.labels("store_timeout").inc()
                raise Overloaded(live.retry_after_s) from exc
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

    def _forwarding(self, request: Exchange) -> Forwarding:
        """Who the client is (forwarded.py): the socket's peer, or as far back as the
        trusted proxies in front vouch for."""
        scheme = "https" if request.tls else "http"
        trusted = self._trusted
        headers = forwarding_headers(request.headers) if trusted else ()
        return forwarding(request.remote, scheme, trusted, headers)

    def __repr__(self) -> str:
        return f"DataPlane(pinning={self._live.pinning}, registry={self._registry!r})"
