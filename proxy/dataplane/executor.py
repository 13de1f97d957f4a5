"""The executor of one request's lifecycle: the I/O half of proxy/policy/lifecycle.py.

Theory of operation. Every decision between "the session id is known" and "a
response head is ready to relay" is the pure state machine's (``Lifecycle``);
``LifecycleExecutor.run`` is the loop around it. Each ``Step`` carries synchronous
effects, applied here in order (``_apply``: counters, log lines, passive health,
closing a withheld response), and one action, which is either awaited (a pin-store
call, a send, a wait for the registry) and fed back as an event, or terminal
(``Relay``: the response goes to relay.py; ``Fail``: its error is raised to the
handler's boundary). What each send's outcome means to the machine is translated in
one place (``_attempt``); the send itself is the Forwarder's (forwarder.py).

Pin-store calls go through ``_stored``: a call that timed out while other calls
succeeded, or while the event loop itself ran late by half the timeout or more,
is this process's overload, not the store's failure, and is answered
``proxy_overloaded`` (counted as a shed, reason ``store_timeout``).

The retry budget (proxy/policy/retry_budget.py) is shared by every request: a
request counts as retrying from its first budgeted retry to its end.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, TypeVar

from proxy.core.errors import (
    Overloaded,
    StoreUnavailable,
    UpstreamConnectError,
    UpstreamDropped,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.dataplane.pin_token_http import changed_against_token
from proxy.policy.lifecycle import Lifecycle
from proxy.policy.lifecycle_messages import (
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
    Send,
    SendFailed,
    Waited,
    WaitForRegistry,
    World,
)

T = TypeVar("T")

if TYPE_CHECKING:
    import random
    from collections.abc import Awaitable, Callable

    from proxy.core.clock import Clock
    from proxy.core.events import Outcome
    from proxy.core.ewma import LoadTracker
    from proxy.core.forwarded import Forwarding
    from proxy.core.models import Pin
    from proxy.dataplane.exchange import Exchange
    from proxy.dataplane.forwarder import Forwarder
    from proxy.dataplane.live_policy import LivePolicies
    from proxy.dataplane.relay import Served
    from proxy.dataplane.request_body import RequestBody
    from proxy.fleet.registry import Registry
    from proxy.policy.pin_token import TokenCheck
    from proxy.policy.retry_budget import RetryBudget
    from proxy.store import Lookup, PinStore
    from proxy.telemetry.loop_lag import LoopLagMonitor
    from proxy.telemetry.metrics import ProxyMetrics

# The data plane's logger: these warnings are the data plane's, as before the split.
logger = logging.getLogger("proxy.dataplane.plane")

# RFC 9110 §9.2.2: a request written once may be written again (after a dropped
# connection) only with one of these methods, or with an Idempotency-Key.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class LifecycleExecutor:
    """Runs requests' lifecycles; every I/O dependency is passed in."""

    def __init__(
        self,
        *,
        registry: Registry,
        store: PinStore,
        loads: LoadTracker,
        forwarder: Forwarder,
        metrics: ProxyMetrics,
        clock: Clock,
        rng: random.Random,
        budget: RetryBudget,
        store_timeout_s: float,
        loop_lag: LoopLagMonitor | None,
        probe: Callable[[str], None],
    ) -> None:
        """``probe`` polls one backend's ``/version`` out of turn (Discovery.probe);
        ``store_timeout_s`` is the pin store's per-call timeout (see ``_stored``)."""
        self._registry = registry
        self._store = store
        self._loads = loads
        self._forwarder = forwarder
        self._metrics = metrics
        self._clock = clock
        self._rng = rng
        self._budget = budget
        self._store_timeout_s = store_timeout_s
        self._loop_lag = loop_lag
        self._probe = probe

    async def run(
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
            if body.continues:
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
            return None, live.lost_pin.check(found, body.continues, expired)
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
            served = await self._forwarder.send(
                request, request_id, traceparent, body, action, forwarding
            )
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

    def __repr__(self) -> str:
        return f"LifecycleExecutor(budget={self._budget!r})"
