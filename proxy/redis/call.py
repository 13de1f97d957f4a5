"""The one way pinproxy calls Redis: bounded, and redis-py's failures as a narrow error.

Every component that talks to Redis (pin store, audit trail, traffic counts, control
plane, rollout state) awaits its operations through a ``RedisCall``: each call is
bounded by the operation timeout whatever the client's own settings (counted in time
the process could run: see ``LagTolerantDeadline``), and every failure
redis-py can raise (``REDIS_FAILURES``) becomes the component's own error (the pin
store's ``StoreUnavailable``, the control plane's ``ControlUnavailable``...), built by
the factory the component passes in from a ``RedisFailure``. A cancellation that
redis-py turned into one of its errors is a cancellation again: the caller asked to
stop.

A call also remembers what a component needs to judge a failure: whether any call
answered while this one waited (then this process, not Redis, is slow) and whether
the last call failed.

Each call is measured here too, so no component can forget to (proxy/redis/metrics.py):
its duration per (component, operation), and each failure by kind. The children of the
operations a component declares are bound when the helper is built; a call under an
undeclared name binds its own on first use (names are literals in the code: bounded).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.redis.client import REDIS_FAILURES
from proxy.redis.metrics import error_kind

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from proxy.redis.metrics import BoundCall, RedisMetrics

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RedisFailure:
    """One failed call, for the component's error factory."""

    what: str  # the operation, as the component named it ("get", "sync", ...)
    exc: BaseException  # redis-py's (or asyncio's) exception; its text may hold secrets
    timed_out: bool  # no answer within the timeout (not a refusal or a broken connection)
    others_answered: bool  # another call through this helper succeeded meanwhile

    @property
    def kind(self) -> str:
        """The exception's class name: safe to show, unlike its text."""
        return type(self.exc).__name__


class LagTolerantDeadline:
    """Expires an ``asyncio.timeout`` after ``timeout_s`` of time this process could run.

    A Redis answer that arrives while the event loop is held (more work than the core
    can do, a long collection, a process the machine did not schedule) is read only
    when the loop runs again, and then the overdue timer runs in the same loop turn,
    before the task the answer would wake: the call would fail on time the store did
    not take. So a timer that runs late by a tenth of the timeout or more waits once
    more, as long as it was late (a timeout more in all at most), for answers already
    there to be read. A store that does not answer still fails the call, a little
    later; one answering on time on a loop running on time is unaffected.
    """

    __slots__ = ("_due", "_grace_s", "_handle", "_loop", "_timeout")

    def __init__(self, timeout: asyncio.Timeout, timeout_s: float) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._grace_s = timeout_s
        self._due = loop.time() + timeout_s
        self._handle = loop.call_at(self._due, self._fire)

    def cancel(self) -> None:
        self._handle.cancel()

    def _fire(self) -> None:
        now = self._loop.time()
        late = now - self._due
        if late >= self._grace_s / 10 > 0:
            extra = min(late, self._grace_s)
            self._grace_s = 0.0  # once
            self._due = now + extra
            self._handle = self._loop.call_at(self._due, self._fire)
            return
        self._timeout.reschedule(now)  # expire now: the awaited call is cancelled


class RedisCall:
    """``await call(what, operation)``: one Redis operation, bounded and translated."""

    __slots__ = ("_answered_at", "_bound", "_clock", "_component", "_error", "_metrics",
                 "_timeout_s", "failing")

    def __init__(
        self,
        timeout_s: float,
        error: Callable[[RedisFailure], Exception],
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: RedisMetrics | None = None,
        component: str = "other",
        operations: Iterable[str] = (),
    ) -> None:
        """``error``: the component's narrow error for a failure (raised ``from`` it).

        ``metrics``: where the calls are measured, as ``component`` (None: unmeasured,
        for tests of a component alone); ``operations``: the names it calls under.
        """
        self._timeout_s = timeout_s
        self._error = error
        self._clock = clock
        self._metrics = metrics
        self._component = component
        self._bound: dict[str, BoundCall] = {}
        if metrics is not None:
            for name in operations:
                self._bound[name] = metrics.bind(component, name)
        self._answered_at = float("-inf")  # when a call last succeeded
        self.failing = False  # the last call failed, and no other answered meanwhile

    async def __call__(self, what: str, operation: Awaitable[T]) -> T:
        bound = self._bound.get(what)
        if bound is None and self._metrics is not None:
            bound = self._bound[what] = self._metrics.bind(self._component, what)
        started = self._clock()
        try:
            async with asyncio.timeout(None) as timeout:
                deadline = LagTolerantDeadline(timeout, self._timeout_s)
                try:
                    result = await operation
                finally:
                    deadline.cancel()
        except REDIS_FAILURES as exc:  # OSError covers asyncio's TimeoutError
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # redis-py can turn a cancellation that lands in its own timeout or
                # reconnect handling into an error; the caller asked to stop, so stop.
                raise asyncio.CancelledError from exc
            failure = RedisFailure(
                what, exc, isinstance(exc, TimeoutError | RedisTimeoutError),
                self._answered_at > started,
            )
            if bound is not None:
                bound.errors[error_kind(exc, failure.timed_out)].inc()
                bound.observe(self._clock() - started)
            if not failure.others_answered:
                self.failing = True
            raise self._error(failure) from exc
        answered = self._answered_at = self._clock()
        if bound is not None:
            bound.observe(answered - started)
        self.failing = False
        return result

    def __repr__(self) -> str:
        return f"RedisCall(timeout={self._timeout_s:g}s, failing={self.failing})"
