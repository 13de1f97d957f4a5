"""Admission control: admit, queue or shed each request before the handler runs (pure).

Theory of operation. A process has a ceiling: past it, every request in flight gets
slower together (they share one event loop), Redis calls start timing out because
their answers wait for the loop, and clients see store errors that are really the
proxy's own overload. Admission keeps the process below that point, as Envoy's
overload manager and nginx's ``limit_conn`` do, and says so honestly:

- at most ``max_in_flight`` requests run the handler at once; a request is in flight
  from admission until its handler returns, so a running stream keeps its slot to its
  end and admission never cuts one off;
- the next ``queue`` arrivals wait, first come first served, for a slot; each waits at
  most ``queue_timeout_s``;
- an arrival that finds the queue full is shed (``queue_full``), a waiter whose time
  ran out is shed (``queue_timeout``), and, when ``max_loop_lag_s`` is set, an arrival
  while the event loop runs that late is shed (``loop_lag``): the process is saturated
  whatever the counts say (a CPU-heavy mix, a machine that starves it).

A shed request is answered ``503 proxy_overloaded`` with ``Retry-After`` by the caller;
nothing was sent upstream and nothing pinned. The decisions live here, as a state
machine over (in flight, the queue, the clock); the async gate that executes them is
proxy/dataplane/admission_gate.py. Time is always passed in (``now``), never read.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

ShedReason = Literal["queue_full", "queue_timeout", "loop_lag"]
SHED_REASONS: tuple[ShedReason, ...] = ("queue_full", "queue_timeout", "loop_lag")


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """The limits admission decides by (``limits.*`` in the config)."""

    max_in_flight: int  # 0: no limit (admission admits everything and counts)
    queue: int  # arrivals that may wait for a slot
    queue_timeout_s: float  # how long one may wait
    max_loop_lag_s: float = 0.0  # shed arrivals while the loop is this late; 0: never


@dataclass(frozen=True, slots=True)
class Admitted:
    """``ticket`` may run the handler now (it holds a slot until ``finish``)."""

    ticket: int


@dataclass(frozen=True, slots=True)
class Queued:
    """``ticket`` waits for a slot until ``deadline`` (then call ``expire``)."""

    ticket: int
    deadline: float


@dataclass(frozen=True, slots=True)
class Shed:
    """``ticket`` is refused, for ``reason``; it holds no slot."""

    ticket: int
    reason: ShedReason


Decision = Admitted | Queued | Shed


class Admission:
    """The admission state machine: feed it arrivals, finishes, expiries; it decides.

    Tickets are the caller's (unique per request). The queue is FIFO; a waiter leaves
    it by being admitted (``finish`` handed it a slot), by expiring, or by ``leave``
    (its client went away).
    """

    __slots__ = ("_limits", "_waiting", "in_flight")

    def __init__(self, limits: AdmissionLimits) -> None:
        self._limits = limits
        self._waiting: OrderedDict[int, float] = OrderedDict()  # ticket -> deadline
        self.in_flight = 0

    @property
    def limits(self) -> AdmissionLimits:
        return self._limits

    @property
    def queued(self) -> int:
        """How many wait for a slot."""
        return len(self._waiting)

    def arrive(self, ticket: int, now: float, loop_lag_s: float = 0.0) -> Decision:
        """A new request: admitted, queued (with its deadline) or shed."""
        limits = self._limits
        if 0 < limits.max_loop_lag_s <= loop_lag_s:
            return Shed(ticket, "loop_lag")
        if self._has_slot() and not self._waiting:
            self.in_flight += 1
            return Admitted(ticket)
        if len(self._waiting) >= limits.queue:
            return Shed(ticket, "queue_full")
        deadline = now + limits.queue_timeout_s
        self._waiting[ticket] = deadline
        return Queued(ticket, deadline)

    def finish(self, now: float) -> list[Decision]:
        """An admitted request's handler returned: its slot goes to the next waiters."""
        if self.in_flight <= 0:
            raise ValueError("finish without an admitted request")
        self.in_flight -= 1
        return self._fill(now)

    def expire(self, ticket: int, now: float) -> Shed | None:
        """A waiter's deadline passed: shed it, unless it was admitted meanwhile."""
        if self._waiting.pop(ticket, None) is None:
            return None
        return Shed(ticket, "queue_timeout")

    def leave(self, ticket: int) -> bool:
        """A waiter gave up (its client hung up): it leaves the queue. Whether it was
        still waiting (else it holds a slot, and must ``finish``)."""
        return self._waiting.pop(ticket, None) is not None

    def reconfigure(self, limits: AdmissionLimits, now: float) -> list[Decision]:
        """New limits (a reload). Requests in flight keep running even over a lower
        ``max_in_flight``; waiters are admitted if the new limit has room, or shed
        (``queue_full``) beyond a shorter queue, the newest first. Deadlines already
        set stand."""
        self._limits = limits
        decisions = self._fill(now)
        while len(self._waiting) > limits.queue:
            ticket, _ = self._waiting.popitem(last=True)
            decisions.append(Shed(ticket, "queue_full"))
        return decisions

    def _has_slot(self) -> bool:
        limit = self._limits.max_in_flight
        return limit == 0 or self.in_flight < limit

    def _fill(self, now: float) -> list[Decision]:
        """Hand free slots to waiters in arrival order; a waiter past its deadline is
        shed on the way (its timer may not have run yet: the loop was late)."""
        decisions: list[Decision] = []
        while self._waiting and self._has_slot():
            ticket, deadline = self._waiting.popitem(last=False)
            if deadline <= now:
                decisions.append(Shed(ticket, "queue_timeout"))
                continue
            self.in_flight += 1
            decisions.append(Admitted(ticket))
        return decisions

    def __repr__(self) -> str:
        return (f"Admission(in_flight={self.in_flight}, queued={self.queued}, "
                f"limits={self._limits})")
