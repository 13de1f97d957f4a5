"""The data-plane handler: every proxied request passes through ``DataPlane.handle``.

Theory of operation, in request order:
1. Read the body and the session id together (request_body.SessionBodyReader): a
   small body is held (replayable); a larger one streams, after as much of it as a
   body session source needs to settle the id (never an unpinned guess).
2. Run the request's lifecycle: every decision from the pin lookup to the response
   head to relay (pin-if-absent before anything is sent, pin races, retirement
   repins, the mismatch guard, refusals, failed connections, replays, pin-wait) is
   made by the pure state machine in proxy/policy/lifecycle.py; executor.py only
   executes its actions (store calls, sends, waits) and effects (counters, passive
   health), and translates each send's result into an event, in one place.
3. Send upstream with ``X-Pinned-Version`` (forwarder.py). On the response head,
   read the version stamp: it is a fresh runtime report, applied to the registry
   before the machine sees the head (nothing has reached the client yet: invariant 5).
4. Stream the body back chunk by chunk (relay.py); record the time to first byte.
5. Whatever happened, tell the observers (``_emit``: one event a request), each
   behind the boundary so an observer's bug never changes a served answer.

A pin-store call that times out while the event loop itself ran late is this
process's overload, not the store's failure: it is answered ``proxy_overloaded``
(counted as a shed, reason ``store_timeout``; see executor.py). It is the backstop
of admission control (admission_gate.py), which refuses at the door, before this
handler runs, what the process cannot take on; a refusal it decided comes in as
``handle``'s ``refusal``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.core.errors import ProxyError, VersionUnavailable
from proxy.core.events import Outcome
from proxy.core.forwarded import Forwarding, TrustedProxies, forwarding
from proxy.core.headers import (
    ensure_traceparent,
    forwarding_headers,
    new_request_id,
    parse_traceparent,
    valid_request_id,
)
from proxy.core.models import Pin
from proxy.dataplane.boundary import ErrorBoundary
from proxy.dataplane.executor import LifecycleExecutor
from proxy.dataplane.forwarder import Forwarder
from proxy.dataplane.live_policy import LivePolicies
from proxy.dataplane.pin_token_http import PinTokenHeaders
from proxy.dataplane.relay import relay, respond_error
from proxy.policy.retry_budget import RetryBudget
from proxy.telemetry.usage import TapLimits

if TYPE_CHECKING:
    import random
    from collections.abc import Callable, Sequence

    from proxy.config.settings import Settings
    from proxy.core.clock import Clock
    from proxy.core.events import RequestObserver
    from proxy.core.ewma import LoadTracker
    from proxy.dataplane.exchange import Exchange
    from proxy.fleet.registry import Registry
    from proxy.policy.routing import RoutingPolicy
    from proxy.store import PinStore
    from proxy.telemetry.loop_lag import LoopLagMonitor
    from proxy.telemetry.metrics import ProxyMetrics
    from proxy.upstream.client import Upstream


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
        self._loads = loads
        self._metrics = metrics
        self._clock = clock
        self._rng = rng
        self._live = live = LivePolicies.from_settings(settings, metrics)
        self._budget = RetryBudget(live.retry_budget_percent, live.min_retry_concurrency)
        self._executor = LifecycleExecutor(
            registry=registry,
            store=store,
            loads=loads,
            forwarder=Forwarder(registry=registry, loads=loads, upstream=upstream, clock=clock),
            metrics=metrics,
            clock=clock,
            rng=rng,
            budget=self._budget,
            store_timeout_s=settings.store.op_timeout_ms / 1000,
            loop_lag=loop_lag,
            probe=probe,
        )
        tokens = settings.sessions.pin_token
        self._tokens = None if tokens is None else PinTokenHeaders(tokens, metrics)
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
        served = await self._executor.run(
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

    def _forwarding(self, request: Exchange) -> Forwarding:
        """Who the client is (forwarded.py): the socket's peer, or as far back as the
        trusted proxies in front vouch for."""
        scheme = "https" if request.tls else "http"
        trusted = self._trusted
        headers = forwarding_headers(request.headers) if trusted else ()
        return forwarding(request.remote, scheme, trusted, headers)

    def __repr__(self) -> str:
        return f"DataPlane(pinning={self._live.pinning}, registry={self._registry!r})"
