"""The injected clock: wall time for records, monotonic time for intervals."""

from __future__ import annotations

from time import monotonic as _monotonic
from time import time as _time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch (for pins, reports, audit records)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for latencies and timeouts)."""
        ...


class SystemClock:
    # The C functions themselves, not methods calling them: a request reads the clock
    # about twenty times, and a Python frame per reading cost ~0.09 µs each.
    time = staticmethod(_time)
    monotonic = staticmethod(_monotonic)

    def __repr__(self) -> str:
        return "SystemClock()"


class ManualClock:
    """A clock tests move by hand; both readings advance together."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._wall = start
        self._mono = 1000.0

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds

    def __repr__(self) -> str:
        return f"ManualClock(time={self._wall:.3f}, monotonic={self._mono:.3f})"
