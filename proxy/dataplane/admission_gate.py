"""The async gate that executes admission's decisions around the data plane's handler.

proxy/core/admission.py decides (admit, queue, shed); this module only waits and
answers: an admitted request runs ``handle`` and gives its slot back when it returns
(a stream at its end), a queued one waits on a future until a slot is handed to it or
its deadline timer fires, a shed one is answered by ``refuse`` with ``Shedding`` (503
``proxy_overloaded``, ``Retry-After``) before anything reads its body, sends upstream
or touches the pin store. It knows no HTTP server's types (request and response are
whatever the caller's handler takes and returns), so any server can put it in front
of the handler.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING, TypeVar

from proxy.core.admission import Admission, AdmissionLimits, Admitted, Decision, Queued, Shed
from proxy.core.errors import ProxyError, Shedding

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from proxy.core.admission import ShedReason

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class AdmissionGate:
    """``await gate.run(request, handle, refuse)``: ``handle(request)`` if admitted, else
    ``refuse(request, Shedding(...))``."""

    __slots__ = ("_clock", "_lag_window_s", "_loop_lag", "_machine", "_on_shed", "_retry_after_s",
                 "_tickets", "_waiters")

    def __init__(
        self,
        limits: AdmissionLimits,
        *,
        clock: Callable[[], float],
        loop_lag: Callable[[float], float] | None = None,
        lag_window_s: float = 0.25,
        on_shed: Callable[[ShedReason], None] = lambda reason: None,
        retry_after_s: int = 1,
    ) -> None:
        """``clock``: monotonic seconds; ``loop_lag(since)``: the worst lateness of the
        event loop's ticks due since then, one overdue now included
        (LoopLagMonitor.worst_since; read only when ``limits.max_loop_lag_s`` is set),
        over the ticks that ran in the last ``lag_window_s``; ``on_shed``: counts a shed
        (metrics); ``retry_after_s``: a shed answer's ``Retry-After``."""
        self._machine = Admission(limits)
        self._clock = clock
        self._loop_lag = loop_lag
        self._lag_window_s = lag_window_s
        self._on_shed = on_shed
        self._retry_after_s = retry_after_s
        self._tickets = itertools.count()
        self._waiters: dict[int, asyncio.Future[Decision]] = {}

    @property
    def in_flight(self) -> int:
        return self._machine.in_flight

    @property
    def queued(self) -> int:
        return self._machine.queued

    async def run(
        self,
        request: Req,
        handle: Callable[[Req], Awaitable[Resp]],
        refuse: Callable[[Req, ProxyError], Awaitable[Resp]],
    ) -> Resp:
        machine = self._machine
        now = self._clock()
        lag_s = 0.0
        max_lag_s = machine.limits.max_loop_lag_s
        if max_lag_s > 0 and self._loop_lag is not None:
            # A tick is filed under when it was due: one that ran late by the threshold
            # or more within the window was due up to that much earlier still.
            lag_s = self._loop_lag(now - self._lag_window_s - max_lag_s)
        ticket = next(self._tickets)
        decision: Decision = machine.arrive(ticket, now, lag_s)
        if isinstance(decision, Queued):
            decision = await self._wait(decision, now)
        if isinstance(decision, Shed):
            self._on_shed(decision.reason)
            return await refuse(request, Shedding(self._retry_after_s, decision.reason))
        try:
            return await handle(request)
        finally:
            self._release()

    def reconfigure(self, limits: AdmissionLimits, retry_after_s: int) -> None:
        """Decide by new limits from now on (see Admission.reconfigure)."""
        self._retry_after_s = retry_after_s
        self._resolve(self._machine.reconfigure(limits, self._clock()))

    async def _wait(self, queued: Queued, now: float) -> Decision:
        """Wait for a slot (Admitted) or the deadline (Shed)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Decision] = loop.create_future()
        self._waiters[queued.ticket] = waiter
        timer = loop.call_later(max(0.0, queued.deadline - now), self._expire, queued.ticket)
        try:
            return await waiter
        except asyncio.CancelledError:
            # The client went away while waiting. If a slot had just been handed to
            # it, the slot goes on to the next waiter.
            if not self._machine.leave(queued.ticket) and waiter.done() and not (
                waiter.cancelled()
            ) and isinstance(waiter.result(), Admitted):
                self._release()
            raise
        finally:
            timer.cancel()
            self._waiters.pop(queued.ticket, None)

    def _expire(self, ticket: int) -> None:
        shed = self._machine.expire(ticket, self._clock())
        if shed is not None:
            self._resolve([shed])

    def _release(self) -> None:
        self._resolve(self._machine.finish(self._clock()))

    def _resolve(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            waiter = self._waiters.get(decision.ticket)
            if waiter is not None and not waiter.done():
                waiter.set_result(decision)
            elif isinstance(decision, Admitted):
                # Its client left as the slot came (the waiter was cancelled, and its
                # task has not yet left the queue): pass the slot on.
                self._release()

    def __repr__(self) -> str:
        return f"AdmissionGate({self._machine!r})"
