"""The request lifecycle (proxy/policy/lifecycle.py) as transcripts: events in, steps out.

Each transcript test plays one story, in the style of mitmproxy's Playbook: the event
the data plane observed, then the step the machine must answer with. The property test
at the end lets hypothesis choose the events (every send's outcome, the fleet's health
as it changes, the clock) and checks the promises that must hold in every order; the
orders that once broke them are kept as ``@example``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.core.errors import NoBackends, UpstreamDropped, UpstreamError, VersionUnavailable
from proxy.core.models import Backend, BackendState, Pin, Snapshot, VersionBundle
from proxy.policy.lifecycle import Lifecycle, LifecycleError, LifecyclePolicy
from proxy.policy.lifecycle_messages import (
    CountMismatch,
    CountNewPin,
    CountRaceLost,
    CountRefusal,
    CountRepin,
    CountRetry,
    Discard,
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
    Step,
    Waited,
    WaitForRegistry,
    World,
)
from proxy.policy.routing import RoutingPolicy

NOW = 1_700_000_000.0
V1 = VersionBundle(prompt="v1").key()
V2 = VersionBundle(prompt="v2").key()
WAIT_S = 2.0


class Flat:
    """Every backend costs the same: P2C is then decided by the seeded rng alone."""

    def cost(self, backend_id: str) -> float:
        return 1.0


def state(bid: str, key: str | None, *, healthy: bool = True, ejected_until: float = 0.0,
          region: str = "r1") -> BackendState:
    bundle = None if key is None else VersionBundle(prompt=key.removeprefix("prompt="))
    return BackendState(
        backend=Backend(id=bid, region=region, url=f"http://{bid}.test"),
        version=bundle, version_key=key, healthy=healthy, reported_at=NOW,
        ejected_until=ejected_until,
    )


def fleet(*states: BackendState, last_seen: dict[str, float] | None = None) -> Snapshot:
    seen = {s.version_key: NOW for s in states if s.version_key}
    seen.update(last_seen or {})
    return Snapshot(backends=states, started_at=NOW - 10_000, version_last_seen=seen)


TWO_BY_TWO = fleet(state("a1", V1), state("a2", V1), state("b1", V2), state("b2", V2))


def world(snapshot: Snapshot = TWO_BY_TWO, *, mono: float = 0.0, budget: bool = True) -> World:
    return World(snapshot, NOW + mono, mono, budget)


def machine(
    session_id: str | None = "s1", *, held: bool = True, idempotent: bool = False,
    refusal_status: int | None = 409, max_attempts: int = 5, seed: int = 0,
) -> Lifecycle:
    policy = LifecyclePolicy(
        routing=RoutingPolicy(retire_after_s=600.0), pin_wait_s=WAIT_S, retry_after_s=2,
        refusal_status=refusal_status, max_attempts=max_attempts,
    )
    return Lifecycle(policy=policy, session_id=session_id, held=held, idempotent=idempotent,
                     arrived=0.0, loads=Flat(), rng=random.Random(seed))


def pin(key: str = V1, backend: str = "a1") -> Pin:
    return Pin(key, backend, "r1", NOW - 60)


def sent_to(step: Step) -> str:
    assert isinstance(step.action, Send), step
    return step.action.forward.backend.id


def effects(step: Step) -> list[type]:
    return [type(e) for e in step.effects]


def pinned_send(m: Lifecycle, w: World | None = None, p: Pin | None = None) -> Step:
    """start, the lookup finding ``p`` (a v1 pin by default): the first send."""
    w = w or world()
    assert m.start(w).action == LookUpPin("s1")
    step = m.step(PinLooked(p or pin()), w)
    assert isinstance(step.action, Send)
    return step


# --- new sessions and pins ------------------------------------------------------------------


def test_a_new_session_is_pinned_before_anything_is_sent() -> None:
    m = machine()
    w = world()
    assert m.start(w) == Step(LookUpPin("s1"))
    step = m.step(PinLooked(None), w)
    assert isinstance(step.action, PinIfAbsent)
    offered = step.action.pin
    step = m.step(PinStored(offered), w)
    assert isinstance(step.action, Send)
    assert step.action.pinned_version == offered.version_key
    assert step.action.forward.backend.id == offered.backend_id
    assert step.effects == (CountNewPin(offered.version_key),)
    step = m.step(HeadReceived(200, offered.version_key), w)
    assert step.action == Relay(m.forward, offered.version_key, failed=False)  # type: ignore[arg-type]
    assert step.effects == (ReportResult(offered.backend_id, True),)
    assert m.new_pin


def test_a_lost_pin_race_sends_to_the_winners_version() -> None:
    m = machine()
    w = world()
    m.start(w)
    offered = m.step(PinLooked(None), w).action
    assert isinstance(offered, PinIfAbsent)
    theirs = V2 if offered.pin.version_key == V1 else V1
    winner = Pin(theirs, "elsewhere", "r9", NOW)
    step = m.step(PinStored(winner), w)
    assert CountRaceLost in effects(step)
    assert isinstance(step.action, Send)
    assert step.action.forward.version_key == theirs
    assert step.action.pinned_version == theirs
    assert not m.new_pin


def test_a_proposal_written_with_the_lookup_sends_at_once_as_a_new_pin() -> None:
    # One round trip for a new session: the store wrote the machine's proposal.
    m = machine()
    w = world()
    assert m.start(w) == Step(LookUpPin("s1"))
    offered = m.propose(w)
    assert offered is not None
    step = m.step(PinLooked(offered, created=True), w)
    assert isinstance(step.action, Send)
    assert step.action.pinned_version == offered.version_key
    assert step.action.forward.backend.id == offered.backend_id
    assert step.effects == (CountNewPin(offered.version_key),)
    assert m.new_pin
    assert m.pin == offered


def proposing(m: Lifecycle, w: World) -> tuple[Pin, str]:
    """start, then the proposal made during the lookup: (it, the other version)."""
    m.start(w)
    offered = m.propose(w)
    assert offered is not None
    return offered, V2 if offered.version_key == V1 else V1


def test_a_proposal_that_meets_a_fresh_pin_of_another_version_lost_a_race() -> None:
    m = machine()
    w = world()
    _, theirs = proposing(m, w)
    winner = Pin(theirs, "elsewhere", "r9", NOW - 0.2)  # chosen while we were choosing
    step = m.step(PinLooked(winner), w)
    assert step.effects == (CountRaceLost(),)
    assert isinstance(step.action, Send)
    assert step.action.pinned_version == theirs
    assert not m.new_pin


def test_a_proposal_that_finds_an_old_pin_follows_it_without_a_race() -> None:
    m = machine()
    w = world()
    _, theirs = proposing(m, w)
    step = m.step(PinLooked(pin(theirs, "b1" if theirs == V2 else "a1")), w)  # an hour old
    assert step.effects == ()
    assert isinstance(step.action, Send)
    assert step.action.pinned_version == theirs
    assert not m.new_pin


def test_a_proposal_the_store_did_not_write_falls_back_to_pin_if_absent() -> None:
    m = machine()
    w = world()
    m.start(w)
    assert m.propose(w) is not None
    step = m.step(PinLooked(None), w)  # e.g. the memory store, or a held copy to re-assert
    assert isinstance(step.action, PinIfAbsent)
    step = m.step(PinStored(step.action.pin), w)
    assert isinstance(step.action, Send)
    assert CountNewPin in effects(step)


def test_no_proposal_without_a_routable_backend_and_no_creation_without_one() -> None:
    m = machine()
    empty = world(fleet())
    m.start(empty)
    assert m.propose(empty) is None
    with pytest.raises(LifecycleError, match="no proposal"):
        m.step(PinLooked(pin(), created=True), empty)


def test_a_request_without_a_session_is_routed_unpinned() -> None:
    m = machine(None)
    step = m.start(world())
    assert isinstance(step.action, Send)
    assert step.action.pinned_version is None
    # An unpinned request's 409 is the backend's own answer: relayed.
    assert isinstance(m.step(HeadReceived(409, V1), world()).action, Relay)


def test_a_retired_version_is_repinned_explicitly_and_the_change_is_said() -> None:
    gone = "prompt=v0"
    snap = fleet(state("a1", V1), last_seen={gone: NOW - 3600})
    m = machine()
    w = world(snap)
    m.start(w)
    step = m.step(PinLooked(pin(gone, "old")), w)
    assert isinstance(step.action, Repin)
    assert step.effects == (CountRepin(gone, V1),)
    assert isinstance(m.step(Repinned(), w).action, Send)
    assert m.version_changed == f"{gone} -> {V1}"


# --- a POP goes down (issue 9: 502s within 10 ms of a POP dying) -----------------------------


def test_a_refused_connection_marks_the_backend_suspect_and_tries_its_peer() -> None:
    m = machine()
    first = pinned_send(m)
    tried = sent_to(first)
    step = m.step(SendFailed("connect", "refused"), world())
    assert step.effects[:3] == (
        MarkSuspect(tried, "refused"), ReportResult(tried, False), CountRetry("connect", False)
    )
    peer = sent_to(step)
    assert peer != tried
    assert peer in ("a1", "a2")


def test_a_pinned_session_waits_for_its_version_then_gets_503_never_502() -> None:
    m = machine()
    pinned_send(m)
    m.step(SendFailed("connect", "refused"), world())
    down = fleet(state("a1", V1, healthy=False), state("a2", V1, healthy=False),
                 state("b1", V2), state("b2", V2))
    step = m.step(SendFailed("connect", "refused"), world(down, mono=0.01))
    assert step.action == WaitForRegistry(WAIT_S)
    step = m.step(Waited(), world(down, mono=WAIT_S))
    assert isinstance(step.action, Fail)
    assert isinstance(step.action.error, VersionUnavailable)
    assert step.action.error.version_key == V1


def test_a_backend_that_comes_back_during_the_wait_takes_the_request() -> None:
    m = machine()
    pinned_send(m)
    m.step(SendFailed("connect", "refused"), world())
    down = fleet(state("a1", V1, healthy=False), state("a2", V1, healthy=False))
    assert isinstance(m.step(SendFailed("connect", "x"), world(down)).action, WaitForRegistry)
    back = fleet(state("a1", V1, healthy=False), state("a2", V1))  # re-polled healthy
    assert sent_to(m.step(Waited(), world(back, mono=0.5))) == "a2"


def test_a_wait_ends_when_an_ejection_does() -> None:
    m = machine()
    out = fleet(state("a1", V1, ejected_until=NOW + 0.3), state("b1", V2))
    m.start(world(out))
    step = m.step(PinLooked(pin()), world(out))
    assert step.action == WaitForRegistry(pytest.approx(0.3))  # type: ignore[arg-type]


# --- a cooperating backend refuses (issue 9: unstamped 409s relayed) -------------------------


def test_a_refusal_is_withheld_and_the_next_backend_of_the_version_asked() -> None:
    m = machine()
    tried = sent_to(pinned_send(m))
    step = m.step(HeadReceived(409, V1), world())
    assert step.effects[:3] == (Discard(tried), Reprobe(tried), CountRefusal(tried, V1))
    assert CountRetry("refused", False) in step.effects
    assert sent_to(step) not in (tried, "b1", "b2")


def test_the_refusal_status_is_configurable_and_can_be_turned_off() -> None:
    m = machine(refusal_status=421)
    pinned_send(m)
    assert isinstance(m.step(HeadReceived(421, V1), world()).action, Send)
    m = machine(refusal_status=None)
    pinned_send(m)
    assert isinstance(m.step(HeadReceived(409, V1), world()).action, Relay)


def test_a_streamed_body_refused_cannot_be_resent_and_is_unavailable() -> None:
    m = machine(held=False)
    pinned_send(m)
    step = m.step(HeadReceived(409, V1), world())
    assert isinstance(step.action, Fail)
    assert isinstance(step.action.error, VersionUnavailable)


# --- the mismatch guard ------------------------------------------------------------------------


def test_an_answer_stamped_with_another_version_is_withheld() -> None:
    m = machine()
    tried = sent_to(pinned_send(m))
    step = m.step(HeadReceived(200, V2), world())
    assert step.effects[:2] == (Discard(tried), CountMismatch(tried, V1, V2))
    assert sent_to(step) != tried


# --- a POST is never sent twice (issue 9: the same POST reached backends 3 times) ------------


def test_a_written_post_that_was_dropped_is_answered_503_not_replayed() -> None:
    m = machine(idempotent=False)
    tried = sent_to(pinned_send(m))
    step = m.step(SendFailed("dropped", "closed before answering"), world())
    assert isinstance(step.action, Fail)
    assert isinstance(step.action.error, UpstreamDropped)
    assert step.action.error.status == 503
    assert step.action.error.code == "upstream_dropped"
    assert step.action.error.headers == {"Retry-After": "2"}
    assert MarkSuspect(tried, "closed before answering") in step.effects


def test_a_dropped_post_on_a_reused_connection_is_not_a_suspect_backend() -> None:
    m = machine(idempotent=False)
    tried = sent_to(pinned_send(m))
    step = m.step(SendFailed("dropped", "closed", reused=True), world())
    assert isinstance(step.action, Fail)
    assert MarkSuspect(tried, "closed") not in step.effects
    # ...but it is asked at once whether it is still there (a dying POP drops its
    # pooled connections first; its refused probe then marks it suspect).
    assert Reprobe(tried) in step.effects


def test_an_idempotent_request_is_replayed_within_the_budget_only() -> None:
    m = machine(idempotent=True)
    pinned_send(m)
    step = m.step(SendFailed("dropped", "closed"), world())
    assert CountRetry("dropped", True) in step.effects
    assert isinstance(step.action, Send)
    m = machine(idempotent=True)
    pinned_send(m)
    step = m.step(SendFailed("dropped", "closed"), world(budget=False))
    assert isinstance(step.action, Fail)


def test_timeouts_and_broken_heads_are_answered_and_reported() -> None:
    for kind, status in (("timeout", 504), ("invalid", 502)):
        m = machine(idempotent=True)
        tried = sent_to(pinned_send(m))
        step = m.step(SendFailed(kind, "x"), world())  # type: ignore[arg-type]
        assert isinstance(step.action, Fail)
        assert step.action.error.status == status
        assert step.effects == (ReportResult(tried, False),)


def test_an_oversized_response_head_is_answered_502_with_its_code_and_not_retried() -> None:
    m = machine(idempotent=True)
    tried = sent_to(pinned_send(m))
    step = m.step(SendFailed("invalid", "x", code="upstream_head_too_large"), world())
    assert isinstance(step.action, Fail)
    assert (step.action.error.status, step.action.error.code) == (502, "upstream_head_too_large")
    assert step.effects == (ReportResult(tried, False),)


# --- a fast-failing backend (issue 9: a 1 ms 500 took 57 of 60 requests) ----------------------


def test_a_5xx_is_relayed_but_reported_as_a_failure() -> None:
    m = machine()
    tried = sent_to(pinned_send(m))
    step = m.step(HeadReceived(500, V1), world())
    assert isinstance(step.action, Relay)
    assert step.action.failed
    assert step.effects == (ReportResult(tried, False),)


# --- bounds and order ---------------------------------------------------------------------------


def test_attempts_are_bounded_across_every_kind_of_retry() -> None:
    m = machine(max_attempts=2)
    pinned_send(m)
    m.step(HeadReceived(409, V1), world())
    step = m.step(HeadReceived(200, V2), world())
    assert isinstance(step.action, Fail)
    assert m.attempts == 2


def test_an_unpinned_request_with_no_backend_is_no_backends() -> None:
    m = machine(None)
    empty = fleet()
    assert isinstance(m.start(world(empty)).action, WaitForRegistry)
    step = m.step(Waited(), world(empty, mono=WAIT_S))
    assert isinstance(step.action, Fail)
    assert isinstance(step.action.error, NoBackends)


def test_an_event_out_of_order_is_a_bug_not_a_guess() -> None:
    m = machine()
    with pytest.raises(LifecycleError):
        m.step(HeadReceived(200, V1), world())



# --- properties over generated event orders ---------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one send meets: a failure kind, or a head (status, served version)."""

    kind: str  # "connect" | "dropped" | "timeout" | "invalid" | "head"
    status: int = 200
    served: str = V1
    reused: bool = False


outcomes = st.one_of(
    st.builds(Outcome, st.sampled_from(["connect", "dropped", "timeout", "invalid"]),
              reused=st.booleans()),
    st.builds(Outcome, st.just("head"), st.sampled_from([200, 200, 409, 500, 503]),
              st.sampled_from([V1, V2])),
)


@settings(max_examples=300, deadline=None)
@given(
    outs=st.lists(outcomes, min_size=1, max_size=12),
    idempotent=st.booleans(),
    held=st.booleans(),
    healthy=st.lists(st.booleans(), min_size=4, max_size=4),
    budget=st.booleans(),
    seed=st.integers(0, 2**16),
)
# The POP that died: both v1 backends refuse; the session must end on 503, never 502.
@example(outs=[Outcome("connect"), Outcome("connect")], idempotent=False, held=True,
         healthy=[True, True, True, True], budget=True, seed=0)
# The POST that went out three times: dropped once, it must not go out again.
@example(outs=[Outcome("dropped"), Outcome("head")], idempotent=False, held=True,
         healthy=[True, True, True, True], budget=True, seed=0)
# The unstamped 409 after a silent flip: never relayed.
@example(outs=[Outcome("head", 409, V1), Outcome("head", 200, V1)], idempotent=False,
         held=True, healthy=[True, True, True, True], budget=True, seed=1)
# The backend failing fast: its 500 is relayed as a failure, never taken as a fast answer.
@example(outs=[Outcome("head", 500, V1)], idempotent=False, held=True,
         healthy=[True, True, True, True], budget=True, seed=0)
# The backend restarted on another version at the same URL, unstamped by a poll yet: its
# connections were refused, then it answers as v2; that answer is withheld.
@example(outs=[Outcome("connect"), Outcome("head", 200, V2), Outcome("head", 200, V1)],
         idempotent=False, held=True, healthy=[True, True, True, True], budget=True, seed=0)
def test_a_pinned_session_is_only_ever_answered_by_its_version(
    outs: list[Outcome], idempotent: bool, held: bool, healthy: list[bool], budget: bool,
    seed: int,
) -> None:
    states = [state("a1", V1), state("a2", V1), state("b1", V2), state("b2", V2)]
    snap = fleet(*(replace(s, healthy=h) for s, h in zip(states, healthy, strict=True)))
    m = machine(held=held, idempotent=idempotent, seed=seed)
    mono = 0.0
    w = world(snap, mono=mono, budget=budget)
    m.start(w)
    step = m.step(PinLooked(pin()), w)
    sends: list[Send] = []
    pending = list(outs)
    dropped_once = False
    last_status = 0
    for _ in range(50):
        action = step.action
        if isinstance(action, Fail):
            if isinstance(action.error, UpstreamError):
                # A gateway error only ever follows a written request, never a dead backend.
                assert sends
                assert not isinstance(action.error, NoBackends)
            break
        if isinstance(action, Relay):
            assert action.served_key == V1, "a pinned session answered by another version"
            assert action.failed == (last_status >= 500)
            break
        if isinstance(action, WaitForRegistry):
            mono = max(mono, action.until)
            step = m.step(Waited(), world(snap, mono=mono, budget=budget))
            continue
        assert isinstance(action, Send)
        assert action.forward.version_key == V1
        assert action.pinned_version == V1
        if dropped_once:
            assert idempotent, "a non-idempotent request written twice"
            assert held
        sends.append(action)
        assert len(sends) <= m.policy.max_attempts
        out = pending.pop(0) if pending else Outcome("head")
        mono += 0.01
        w = world(snap, mono=mono, budget=budget)
        if out.kind == "head":
            last_status = out.status
            step = m.step(HeadReceived(out.status, out.served), w)
        else:
            if out.kind == "dropped":
                dropped_once = True
            step = m.step(SendFailed(out.kind, "x", reused=out.reused), w)  # type: ignore[arg-type]
        if out.kind == "connect" or (out.kind == "dropped" and not out.reused):
            # What the data plane's registry would do with MarkSuspect.
            bid = action.forward.backend.id
            snap = fleet(*(replace(s, healthy=False) if s.id == bid else s
                           for s in snap.backends))
    else:
        pytest.fail("the lifecycle did not end")
    assert isinstance(step.action, (Fail, Relay))


@settings(max_examples=200, deadline=None)
@given(
    healthy=st.lists(st.booleans(), min_size=4, max_size=4),
    answer=st.sampled_from(["created", "declined", "theirs_fresh", "theirs_old", "ours_too"]),
    seed=st.integers(0, 2**16),
)
def test_a_new_session_is_sent_only_to_the_version_the_store_holds(
    healthy: list[bool], answer: str, seed: int
) -> None:
    """However the one-round-trip lookup answers, nothing is sent before the session's
    pin is in the store, and the send goes to that pin's version; a race is counted
    only for a fresh pin of another version."""
    states = [state("a1", V1), state("a2", V1), state("b1", V2), state("b2", V2)]
    snap = fleet(*(replace(s, healthy=h) for s, h in zip(states, healthy, strict=True)))
    w = world(snap)
    m = machine(seed=seed)
    m.start(w)
    offered = m.propose(w)
    if offered is None:
        assert not any(healthy)
        assert isinstance(m.step(PinLooked(None), w).action, WaitForRegistry)
        return
    other = V2 if offered.version_key == V1 else V1
    held: Pin | None = {
        "created": offered,
        "declined": None,
        "theirs_fresh": Pin(other, "elsewhere", "r9", offered.pinned_at),
        "theirs_old": Pin(other, "elsewhere", "r9", offered.pinned_at - 3600),
        "ours_too": Pin(offered.version_key, "elsewhere", "r9", offered.pinned_at),
    }[answer]
    step = m.step(PinLooked(held, created=answer == "created"), w)
    assert (CountRaceLost in effects(step)) == (answer == "theirs_fresh")
    if isinstance(step.action, PinIfAbsent):
        held = step.action.pin
        step = m.step(PinStored(held), w)
    assert held is not None
    if isinstance(step.action, WaitForRegistry):
        # The winner's version has no healthy backend here: wait for it, never re-pin.
        assert not any(h for s, h in zip(states, healthy, strict=True)
                       if s.version_key == held.version_key)
        return
    assert isinstance(step.action, Send)
    assert step.action.pinned_version == held.version_key
    assert m.new_pin == (answer in ("created", "declined"))
