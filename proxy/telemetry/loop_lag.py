"""Event-loop lag: how late a timer fires is how long every request waited for the loop.

Anything that holds the event loop (a garbage collection, a large batch serialised in
one go, a slow callback, more work than the core can do) delays every request in
flight by the same amount, and none of them can say why. A timer armed every
``interval_s`` measures it directly: the time between when it was due and when it ran.
The cost is one timer per interval, nothing per request.

The last ``history_s`` of ticks are kept, so a request whose pin-store call timed out
can ask whether the loop itself was late meanwhile (``worst_since``): then the time
went to this process being saturated, not to the store.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


class LoopLagMonitor:
    """Reports each tick's lateness (seconds) to ``observe`` while started."""

    def __init__(
        self,
        observe: Callable[[float], None],
        *,
        interval_s: float = 0.05,
        history_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._observe = observe
        self._interval_s = interval_s
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._history: deque[tuple[float, float]] = deque(
            maxlen=max(1, round(history_s / interval_s))
        )  # (when the tick was due, how late it ran)
        self.ticks = 0
        self.worst_s = 0.0

    def start(self) -> None:
        if self._handle is None:
            self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def worst_since(self, since: float) -> float:
        """The worst lateness of ticks due at or after ``since`` (the clock's time),
        counting a tick that is overdue right now."""
        worst = 0.0
        for due, lag in reversed(self._history):
            if due < since:
                break
            worst = max(worst, lag)
        if self._handle is not None:
            worst = max(worst, self._clock() - self._due)
        return worst

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = self._clock() + self._interval_s
        self._handle = loop.call_later(self._interval_s, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        lag = max(0.0, self._clock() - self._due)
        self.ticks += 1
        self.worst_s = max(self.worst_s, lag)
        self._history.append((self._due, lag))
        self._observe(lag)
        self._schedule(loop)

    def __repr__(self) -> str:
        return (f"LoopLagMonitor(interval_s={self._interval_s}, ticks={self.ticks}, "
                f"worst_ms={self.worst_s * 1000:.1f})")
