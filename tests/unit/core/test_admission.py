"""Admission control (proxy/core/admission.py) as transcripts: arrivals, finishes and
expiries in, decisions out; then a property test over any order of them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.admission import (
    Admission,
    AdmissionLimits,
    Admitted,
    Queued,
    Shed,
)

LIMITS = AdmissionLimits(max_in_flight=2, queue=2, queue_timeout_s=1.0)


def full(*waiting: tuple[int, float]) -> Admission:
    """A machine under LIMITS with tickets 1 and 2 running, then ``waiting`` queued
    (ticket, arrival time)."""
    machine = Admission(LIMITS)
    for ticket in (1, 2):
        machine.arrive(ticket, 0.0)
    for ticket, at in waiting:
        machine.arrive(ticket, at)
    return machine


def test_admits_up_to_the_limit_then_queues_then_sheds_queue_full() -> None:
    machine = Admission(LIMITS)
    assert machine.arrive(1, 0.0) == Admitted(1)
    assert machine.arrive(2, 0.0) == Admitted(2)
    assert machine.arrive(3, 0.1) == Queued(3, deadline=1.1)
    assert machine.arrive(4, 0.2) == Queued(4, deadline=1.2)
    assert machine.arrive(5, 0.3) == Shed(5, "queue_full")
    assert (machine.in_flight, machine.queued) == (2, 2)


def test_a_finish_hands_its_slot_to_the_oldest_waiter() -> None:
    machine = full((3, 0.1), (4, 0.2))
    assert machine.finish(0.5) == [Admitted(3)]
    assert (machine.in_flight, machine.queued) == (2, 1)
    assert machine.expire(3, 1.1) is None  # admitted meanwhile: its timer changes nothing
    assert machine.finish(0.6) == [Admitted(4)]
    assert machine.finish(0.7) == []
    assert (machine.in_flight, machine.queued) == (1, 0)


def test_a_waiter_past_its_deadline_is_shed_by_its_timer() -> None:
    machine = full((3, 0.0))
    assert machine.expire(3, 1.0) == Shed(3, "queue_timeout")
    assert machine.queued == 0
    assert machine.finish(1.5) == []


def test_a_waiter_whose_timer_is_late_is_shed_when_a_slot_frees_after_its_deadline() -> None:
    # The loop ran late: the slot frees before the overdue timer fires; the next waiter
    # still in time gets it.
    machine = full((3, 0.0), (4, 0.5))
    assert machine.finish(1.2) == [Shed(3, "queue_timeout"), Admitted(4)]
    assert machine.expire(3, 1.3) is None


def test_a_newcomer_never_overtakes_the_queue() -> None:
    machine = Admission(AdmissionLimits(max_in_flight=1, queue=1, queue_timeout_s=1.0))
    machine.arrive(1, 0.0)
    machine.arrive(2, 0.0)
    # Ticket 1 finishes; its slot goes to 2, so 3 finds none free and queues.
    assert machine.finish(0.1) == [Admitted(2)]
    assert machine.arrive(3, 0.1) == Queued(3, deadline=1.1)


def test_a_waiter_that_leaves_frees_its_place() -> None:
    machine = full((3, 0.0))
    assert machine.leave(3)
    assert not machine.leave(3)
    assert machine.finish(0.1) == []


def test_no_queue_sheds_at_once() -> None:
    machine = Admission(AdmissionLimits(max_in_flight=1, queue=0, queue_timeout_s=1.0))
    assert machine.arrive(1, 0.0) == Admitted(1)
    assert machine.arrive(2, 0.0) == Shed(2, "queue_full")


def test_no_limit_admits_everything() -> None:
    machine = Admission(AdmissionLimits(max_in_flight=0, queue=0, queue_timeout_s=1.0))
    assert all(machine.arrive(t, 0.0) == Admitted(t) for t in range(1000))
    assert machine.in_flight == 1000


def test_loop_lag_sheds_arrivals_only_when_set() -> None:
    lagging = Admission(AdmissionLimits(2, 2, 1.0, max_loop_lag_s=0.2))
    assert lagging.arrive(1, 0.0, loop_lag_s=0.19) == Admitted(1)
    assert lagging.arrive(2, 0.0, loop_lag_s=0.2) == Shed(2, "loop_lag")
    assert lagging.in_flight == 1
    off = Admission(LIMITS)
    assert off.arrive(1, 0.0, loop_lag_s=30.0) == Admitted(1)


def test_finish_without_an_admitted_request_is_a_bug() -> None:
    with pytest.raises(ValueError, match="finish without"):
        Admission(LIMITS).finish(0.0)


def test_reconfigure_admits_into_a_larger_limit_and_sheds_beyond_a_shorter_queue() -> None:
    machine = Admission(AdmissionLimits(max_in_flight=1, queue=3, queue_timeout_s=1.0))
    machine.arrive(1, 0.0)
    for ticket in (2, 3, 4):
        machine.arrive(ticket, 0.0)
    decisions = machine.reconfigure(AdmissionLimits(max_in_flight=2, queue=1,
                                                    queue_timeout_s=1.0), 0.1)
    assert decisions == [Admitted(2), Shed(4, "queue_full")]
    assert (machine.in_flight, machine.queued) == (2, 1)
    # A lower limit cuts nobody: both keep running; the waiter waits for both.
    machine.reconfigure(AdmissionLimits(max_in_flight=1, queue=1, queue_timeout_s=1.0), 0.2)
    assert machine.finish(0.3) == []
    assert machine.finish(0.4) == [Admitted(3)]


@dataclass
class Model:
    """What the property test remembers about each ticket."""

    running: set[int]
    waiting: dict[int, float]  # ticket -> deadline
    done: set[int]


events = st.lists(
    st.tuples(
        st.sampled_from(["arrive", "finish", "expire", "leave", "reconfigure"]),
        st.integers(min_value=0, max_value=40),  # which ticket (for expire/leave)
        st.floats(min_value=0.0, max_value=0.5),  # time passing before the event
        st.integers(min_value=0, max_value=4),  # a limit (for reconfigure)
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(events=events, max_in_flight=st.integers(0, 4), queue=st.integers(0, 4))
def test_every_order_keeps_the_promises(
    events: list[tuple[str, int, float, int]], max_in_flight: int, queue: int
) -> None:
    """In any order of events: never more in flight than the limit (beyond what a
    reload lowered), never more waiting than the queue, FIFO admission, every ticket
    decided once, a shed ticket never admitted, no waiter admitted past its deadline."""
    limits = AdmissionLimits(max_in_flight, queue, queue_timeout_s=1.0)
    machine = Admission(limits)
    model = Model(set(), {}, set())
    now, ticket, admitted_order, queued_order = 0.0, 0, [], []

    def apply(decision: Admitted | Queued | Shed) -> None:
        t = decision.ticket
        assert t not in model.done
        assert t not in model.running
        if isinstance(decision, Queued):
            model.waiting[t] = decision.deadline
            queued_order.append(t)
            return
        was_waiting = model.waiting.pop(t, None)
        if isinstance(decision, Admitted):
            assert was_waiting is None or was_waiting > now
            model.running.add(t)
            if was_waiting is not None:
                admitted_order.append(t)
        else:
            model.done.add(t)

    for kind, which, passing, limit in events:
        now += passing
        if kind == "arrive":
            ticket += 1
            apply(machine.arrive(ticket, now))
        elif kind == "finish" and model.running:
            done = min(model.running)
            model.running.discard(done)
            model.done.add(done)
            for decision in machine.finish(now):
                apply(decision)
        elif kind == "expire" and which in model.waiting and model.waiting[which] <= now:
            shed = machine.expire(which, now)
            assert shed == Shed(which, "queue_timeout")
            apply(shed)
        elif kind == "leave":
            assert machine.leave(which) == (which in model.waiting)
            if model.waiting.pop(which, None) is not None:
                model.done.add(which)
                queued_order.remove(which)
        elif kind == "reconfigure":
            limits = AdmissionLimits(limit, limit, queue_timeout_s=1.0)
            for decision in machine.reconfigure(limits, now):
                apply(decision)
        assert machine.in_flight == len(model.running)
        assert machine.queued == len(model.waiting) <= limits.queue
        # Nobody waits while a slot is free (over the limit only by requests admitted
        # before a reload lowered it).
        assert not model.waiting or machine.in_flight >= limits.max_in_flight > 0
    # Waiters were admitted in the order they queued.
    assert admitted_order == [t for t in queued_order if t in admitted_order]
