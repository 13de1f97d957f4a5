"""``Deadline``: one re-armable timer, set again without a timer made per arm.

A client connection arms a deadline for every request (the head deadline when its first
byte arrives, the keep-alive timer once its answer is out), and most are never reached.
Creating and cancelling a uvloop timer for each costs ~1.7 µs a pair, two pairs a
request. A ``Deadline`` keeps at most one timer: arming it for a time no earlier than
the timer already set only records the new time and callback; the timer, when it fires
early, sets itself again for the rest. Disarming only forgets the callback, so a timer
still set fires into nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

# uvloop's timers tick in milliseconds: one that fires this close to its deadline is due.
_SLACK_S = 0.001


class Deadline:
    """Calls its callback once, at the time last armed, unless disarmed or re-armed."""

    __slots__ = ("_callback", "_due", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0  # loop time at which _callback is called
        self._callback: Callable[[], None] | None = None

    def arm(self, delay: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` in ``delay`` seconds instead of whatever was armed before."""
        due = self._loop.time() + delay
        self._due = due
        self._callback = callback
        timer = self._timer
        if timer is not None:
            if timer.when() <= due:
                return  # it fires first and sets itself for the rest (_fire)
            timer.cancel()
        self._timer = self._loop.call_at(due, self._fire)

    def disarm(self) -> None:
        """Call nothing (a timer still set fires into nothing)."""
        self._callback = None

    def cancel(self) -> None:
        """Call nothing and drop the timer (the connection is gone)."""
        self._callback = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        callback = self._callback
        if callback is None:
            return  # disarmed since
        if self._loop.time() < self._due - _SLACK_S:
            self._timer = self._loop.call_at(self._due, self._fire)  # re-armed later since
            return
        self._callback = None
        callback()

    def __repr__(self) -> str:
        armed = self._callback is not None
        return f"Deadline(armed={armed}, due={self._due:.3f}, timer={self._timer is not None})"
