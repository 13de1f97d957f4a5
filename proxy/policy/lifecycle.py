"""The lifecycle of one proxied request, as a pure state machine.

Theory of operation
-------------------
Everything pinproxy decides about a request between "its session id is known" and
"a response head is ready to relay" lives here, with no I/O, no clock and no awaits:
in the style of h11's state tables and mitmproxy's layers, the machine takes
*events* (what the data plane observed) and answers with a ``Step``: a few
synchronous *effects* (count this, mark that backend suspect, close that response
unseen) and exactly one *action*, the next thing to await (look the pin up, write
it if absent, send to backend X, wait for the registry until T) or a terminal one
(relay the response just received, answer error E). ``LifecycleExecutor`` is the loop
that executes actions and feeds their results back (proxy/dataplane/executor.py);
the messages themselves are in lifecycle_messages.py (import them from there), the
shared retry budget the ``World`` reports on is retry_budget.py; tests
drive the machine directly as transcripts (tests/unit/policy/test_lifecycle.py).

Every event carries a ``World``: the registry snapshot current when it happened,
wall-clock and monotonic time, and whether the global retry budget has room. So a
transition is a pure function of (state, event, world), plus the routing rng.

The rules, as transitions (the issue numbers of the bugs they fix are in the tests):

- Pin lookup, pin-if-absent, pin races and retirement repins are as in routing.py:
  a new session is pinned before anything is sent; when another replica's pin won
  with another version, the choice is made again among the winner's backends.
- One round trip for a new session: while the lookup is under way, ``propose`` makes
  the choice an unpinned session would get, so a store can look the pin up and write
  that one if none is held, in one call (``PinLooked(created=True)``: pinned, send).
  A proposal that finds another version's pin written within ``RACE_WINDOW_S`` of it
  lost a race (counted); an older pin is simply the session's pin.
- ``HeadReceived`` whose version stamp disagrees with the pin: the mismatch guard
  closes the response unseen and asks the next backend of the pinned version.
- ``HeadReceived`` with the refusal status (409 by default) to a request that
  carried ``X-Pinned-Version``: the backend refused a version it does not serve.
  Never relayed: its ``/version`` is re-polled at once and the next backend of the
  pinned version is asked.
- ``SendFailed("connect")``: nothing was written, so the request may go anywhere
  of its version; the backend is marked suspect at once (passive health).
- ``SendFailed("dropped")``: the request was written and no head came back. The
  backend may have acted on it, so it is replayed only when the request is
  ``idempotent`` (method or Idempotency-Key) and held in memory, and only while the
  retry budget has room; otherwise 503 ``upstream_dropped`` with Retry-After (the
  client knows whether trying again is safe). A POST is never sent twice.
- Timeouts and invalid heads are answered (504, 502) and fed to outlier detection.
- A 5xx head is relayed (the client sees the backend's own error) but reported as
  a failure, so outlier detection ejects a backend that fails fast and the load
  estimate does not mistake a fast 500 for a fast backend.
- No backend may take it: wait for the registry (a backend coming back, a version
  reported) until ``pin_wait_ms`` after arrival, then 503 ``version_unavailable``
  for a pinned session (never a 502 because its backends died) or ``no_backends``.
  Backends excluded for this request are forgotten when the registry changes: a
  suspect backend is readmitted only by a fresh ``/version`` poll, so if it is
  routable again it has been re-checked.
- Each request sends at most ``max_attempts`` times in all (mismatches and refusals
  included), which bounds every loop above.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from proxy.core.errors import (
    NoBackends,
    ProxyError,
    UpstreamDropped,
    UpstreamError,
    UpstreamTimeout,
    VersionUnavailable,
)
from proxy.core.models import Forward, Pin, RequestFacts, Unavailable
from proxy.policy.lifecycle_messages import (
    CountMismatch,
    CountNewPin,
    CountRaceLost,
    CountRefusal,
    CountRepin,
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
    RetryReason,
    Send,
    SendFailed,
    Step,
    Waited,
    WaitForRegistry,
    World,
)
from proxy.policy.routing import choose

if TYPE_CHECKING:
    import random

    from proxy.policy.routing import LoadView, RoutingPolicy


# --- the machine -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LifecyclePolicy:
    """The settings the machine decides by (see RoutingConfig)."""

    routing: RoutingPolicy
    pin_wait_s: float
    retry_after_s: int
    refusal_status: int | None = 409
    max_attempts: int = 5


# A found pin of another version chosen this close to our proposal was a concurrent
# first turn on another replica (a race), not a session pinned long before.
RACE_WINDOW_S = 1.0

Phase = Literal["start", "lookup", "pinning", "repinning", "sending", "waiting", "done"]


@dataclass(slots=True)
class Lifecycle:
    """One request's state; feed it events with ``step``. Not reusable across requests.

    ``session_id`` is None for a request that is not pinned (no id, or pinning off).
    ``held``: the body is in memory, so the request can be sent again at all;
    ``idempotent``: its method is idempotent or it carries an Idempotency-Key, so a
    request that was written may be replayed.
    """

    policy: LifecyclePolicy
    session_id: str | None
    held: bool
    idempotent: bool
    arrived: float  # monotonic
    loads: LoadView
    rng: random.Random
    phase: Phase = "start"
    pin: Pin | None = None
    proposed: Pin | None = None  # the pin this request offered with pin-if-absent
    offer: Forward | None = None  # the choice behind a proposal made during the lookup
    forward: Forward | None = None
    exclude: set[str] = field(default_factory=set)
    attempts: int = 0
    new_pin: bool = False
    version_changed: str | None = None
    retries: int = 0

    # -- entry ------------------------------------------------------------------------------

    def start(self, world: World) -> Step:
        """The first step: look the pin up, or route an unpinned request."""
        self._expect("start")
        if self.session_id is not None:
            self.phase = "lookup"
            return Step(LookUpPin(self.session_id))
        return self._route(world, ())

    def step(self, event: Event, world: World) -> Step:
        """Apply ``event`` (the result of the last action) and say what to do next."""
        if isinstance(event, PinLooked):
            self._expect("lookup")
            return self._looked(event, world)
        if isinstance(event, PinStored):
            return self._pin_stored(event, world)
        if isinstance(event, Repinned):
            self._expect("repinning")
            return self._send()
        if isinstance(event, Waited):
            self._expect("waiting")
            # What was excluded for this request was marked suspect or re-polled: if it
            # is routable again, the registry has heard from its runtime since.
            self.exclude.clear()
            return self._route(world, ())
        if isinstance(event, HeadReceived):
            return self._head(event, world)
        return self._failed(event, world)

    @property
    def pinned_version(self) -> str | None:
        """The version this request is bound to, once known (pinned or being pinned)."""
        if self.forward is not None and self.session_id is not None:
            return self.forward.version_key
        return None if self.pin is None else self.pin.version_key

    def propose(self, world: World) -> Pin | None:
        """During the lookup: the pin to write if the store holds none, or None.

        The choice ``PinLooked(None)`` would lead to, made now, so that a store can
        look up and pin-if-absent in one round trip. Called at most once, only when
        the store must ask (a cached pin needs no proposal).
        """
        self._expect("lookup")
        assert self.session_id is not None
        facts = RequestFacts(session_id=self.session_id, exclude=frozenset(self.exclude))
        decision = choose(
            facts, None, world.snapshot, self.policy.routing, self.loads, self.rng, world.now
        )
        if isinstance(decision, Unavailable) or not decision.new_pin:
            return None
        self.offer = decision
        self.proposed = Pin(
            decision.version_key, decision.backend.id, decision.backend.region, world.now
        )
        return self.proposed

    # -- transitions ----------------------------------------------------------------------

    def _looked(self, event: PinLooked, world: World) -> Step:
        offer, proposed = self.offer, self.proposed
        self.offer = None
        self.pin = event.pin
        if event.created:
            # The store wrote our proposal: pinned before anything is sent.
            if offer is None or event.pin != proposed:
                raise LifecycleError("a pin created from no proposal, or not from ours")
            self.forward = offer
            self.new_pin = True
            return self._send((CountNewPin(offer.version_key),))
        self.proposed = None
        effects: tuple[Effect, ...] = ()
        found = event.pin
        if (
            proposed is not None and found is not None
            and found.version_key != proposed.version_key
            and found.pinned_at > proposed.pinned_at - RACE_WINDOW_S
        ):
            # Another replica pinned this new session while we were choosing.
            effects = (CountRaceLost(),)
        return self._route(world, effects)


    def _route(self, world: World, effects: tuple[Effect, ...]) -> Step:
        decision = choose(
            RequestFacts(session_id=self.session_id, exclude=frozenset(self.exclude)),
            self.pin,
            world.snapshot,
            self.policy.routing,
            self.loads,
            self.rng,
            world.now,
        )
        if isinstance(decision, Unavailable):
            deadline = self.arrived + self.policy.pin_wait_s
            if world.mono < deadline:
                self.phase = "waiting"
                return Step(WaitForRegistry(self._wake_at(world, deadline)), effects)
            return self._fail(self._unavailable(decision.version_key), effects)
        self.forward = decision
        if self.session_id is not None and decision.new_pin:
            self.phase = "pinning"
            self.proposed = Pin(
                decision.version_key, decision.backend.id, decision.backend.region, world.now
            )
            return Step(PinIfAbsent(self.session_id, self.proposed), effects)
        if self.session_id is not None and decision.repin_from is not None:
            self.phase = "repinning"
            self.pin = Pin(
                decision.version_key, decision.backend.id, decision.backend.region, world.now
            )
            self.version_changed = f"{decision.repin_from} -> {decision.version_key}"
            effects = (*effects, CountRepin(decision.repin_from, decision.version_key,
                                            decision.repin_reason))
            return Step(Repin(self.session_id, self.pin), effects)
        return self._send(effects)

    def _pin_stored(self, event: PinStored, world: World) -> Step:
        self._expect("pinning")
        forward = self.forward
        assert forward is not None
        stored = event.stored
        self.pin = stored
        if stored.version_key != forward.version_key:
            # Another replica pinned this session first: its version holds.
            self.forward = None
            return self._route(world, (CountRaceLost(),))
        if stored == self.proposed:
            self.new_pin = True
            return self._send((CountNewPin(stored.version_key),))
        return self._send()  # a race lost to the same version: send where we chose

    def _send(self, effects: tuple[Effect, ...] = ()) -> Step:
        forward = self.forward
        assert forward is not None
        self.phase = "sending"
        self.attempts += 1
        pinned = forward.version_key if self.session_id is not None else None
        return Step(Send(forward, pinned, self.held and self.idempotent), effects)

    def _head(self, event: HeadReceived, world: World) -> Step:
        self._expect("sending")
        forward = self.forward
        assert forward is not None
        backend_id = forward.backend.id
        pinned = forward.version_key if self.session_id is not None else None
        if pinned is not None and event.served_key != pinned:
            effects: tuple[Effect, ...] = (
                Discard(backend_id), CountMismatch(backend_id, pinned, event.served_key),
            )
            return self._next_backend("version_mismatch", effects, world, pinned)
        refusal = self.policy.refusal_status
        if pinned is not None and refusal is not None and event.status == refusal:
            effects = (Discard(backend_id), Reprobe(backend_id), CountRefusal(backend_id, pinned))
            return self._next_backend("refused", effects, world, pinned)
        failed = event.status >= 500
        self.phase = "done"
        return Step(
            Relay(forward, event.served_key, failed), (ReportResult(backend_id, not failed),)
        )

    def _next_backend(
        self, reason: RetryReason, effects: tuple[Effect, ...], world: World, pinned: str
    ) -> Step:
        """After a withheld answer: the next backend of the pinned version, if any may."""
        forward = self.forward
        assert forward is not None
        self.exclude.add(forward.backend.id)
        if not self.held or self.attempts >= self.policy.max_attempts:
            return self._fail(VersionUnavailable(pinned, self.policy.retry_after_s), effects)
        self.retries += 1
        return self._route(world, (*effects, CountRetry(reason, budgeted=False)))

    def _failed(self, event: SendFailed, world: World) -> Step:
        self._expect("sending")
        forward = self.forward
        assert forward is not None
        backend_id = forward.backend.id
        if event.kind == "timeout":
            return self._fail(UpstreamTimeout(event.message), (ReportResult(backend_id, False),))
        if event.kind == "invalid":
            return self._fail(
                UpstreamError(event.message, code=event.code), (ReportResult(backend_id, False),)
            )
        effects: tuple[Effect, ...] = (ReportResult(backend_id, False),)
        if event.kind == "connect" or not event.reused:
            # Refused, reset or closed unanswered on a fresh connection: the backend
            # is down or broken, not merely done with an idle connection.
            effects = (MarkSuspect(backend_id, event.message), *effects)
        else:
            # Dropped on a pooled connection: a keep-alive race or a POP dying. Not a
            # verdict, but a question asked at once (a poll out of turn, whose refused
            # connection marks the backend suspect), so a dead POP leaves rotation now,
            # not after the polls or a request that happens to pick it again.
            effects = (Reprobe(backend_id), *effects)
        self.exclude.add(backend_id)
        if event.kind == "connect":
            may_retry = self.held and self.attempts < self.policy.max_attempts
            if may_retry:
                self.retries += 1
                return self._route(world, (*effects, CountRetry("connect", budgeted=False)))
            if self.session_id is not None:
                # A pinned session is told its version is unavailable, never a 502.
                return self._fail(self._unavailable(self.pinned_version), effects)
            return self._fail(UpstreamError(event.message), effects)
        # Written, then dropped: replay only what may be replayed, within the budget.
        if (
            self.held
            and self.idempotent
            and world.retry_budget_left
            and self.attempts < self.policy.max_attempts
        ):
            self.retries += 1
            return self._route(world, (*effects, CountRetry("dropped", budgeted=True)))
        return self._fail(
            UpstreamDropped(
                event.message, reused=event.reused, retry_after_s=self.policy.retry_after_s
            ),
            effects,
        )

    # -- helpers --------------------------------------------------------------------------

    def _wake_at(self, world: World, deadline: float) -> float:
        """The deadline, or earlier when an ejection of a usable backend ends before it.

        An ejection ending publishes no snapshot (routing compares it with the time),
        so a waiting request must know when to look again by itself.
        """
        version = self.pinned_version
        states = (
            world.snapshot.backends if version is None
            else world.snapshot.by_key.get(version, ())
        )
        ends = [s.ejected_until for s in states if s.healthy and s.ejected_until > world.now]
        if not ends:
            return deadline
        return min(deadline, world.mono + (min(ends) - world.now))

    def _fail(self, error: ProxyError, effects: tuple[Effect, ...] = ()) -> Step:
        self.phase = "done"
        return Step(Fail(error), effects)

    def _unavailable(self, version_key: str | None) -> ProxyError:
        retry_after = self.policy.retry_after_s
        if version_key is not None:
            return VersionUnavailable(version_key, retry_after)
        return NoBackends(retry_after)

    def _expect(self, phase: Phase) -> None:
        if self.phase != phase:
            raise LifecycleError(f"event out of order: in phase {self.phase!r}, not {phase!r}")


class LifecycleError(Exception):
    """An event arrived that the current phase does not expect: a data-plane bug."""
