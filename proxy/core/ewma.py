"""Peak-EWMA latency estimates per backend: the cost routing compares (clock injected)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.core.clock import Clock

# A failed request (no first byte) carries no latency, but treating it as nothing
# would let a backend that fails fast look like the fastest one and attract the very
# traffic it is failing (a "black hole"). So a failure is observed as a slow sample:
# twice the current estimate, at least FAILURE_MIN_S, and capped at FAILURE_MAX_S so
# a run of failures cannot push the estimate out of reach of the decay for good.
FAILURE_MIN_S = 1.0
FAILURE_MAX_S = 60.0

# The estimate decays toward zero while a backend is idle; below this floor the
# in-flight multiplier would stop telling idle backends apart, so reads never go
# under it.
_COST_FLOOR_S = 1e-6


class PeakEwma:
    """An exponentially weighted latency estimate that jumps up at once and decays slowly.

    ``decay_s`` is the time constant: after ``decay_s`` seconds an old sample weighs
    1/e of what it did. ``initial_s`` is assumed until the first sample arrives.
    """

    __slots__ = ("_clock", "_decay_s", "_stamp", "_value")

    def __init__(self, clock: Clock, decay_s: float, initial_s: float) -> None:
        if decay_s <= 0:
            raise ValueError("decay_s must be positive")
        if initial_s < 0:
            raise ValueError("initial_s must not be negative")
        self._clock = clock
        self._decay_s = decay_s
        self._value = initial_s
        # None until the first sample: the initial value is a guess, not a measurement,
        # so it neither decays nor gets mixed into the first real sample.
        self._stamp: float | None = None

    def observe(self, rtt_s: float) -> None:
        """Take in one latency sample (seconds)."""
        rtt_s = max(rtt_s, 0.0)
        now = self._clock.monotonic()
        if self._stamp is None or rtt_s > self._value:
            self._value = rtt_s
        else:
            w = math.exp(-max(now - self._stamp, 0.0) / self._decay_s)
            self._value = self._value * w + rtt_s * (1.0 - w)
        self._stamp = now

    def value(self) -> float:
        """The estimate now: the last updated value decayed for the time since.

        Reads do not write: decaying in place (as Finagle's reads do) and then mixing the
        next sample with only the weight of the time since that read would let frequent
        reads shrink what each real sample counts for.
        """
        if self._stamp is None:
            return self._value
        idle = max(self._clock.monotonic() - self._stamp, 0.0)
        return self._value * math.exp(-idle / self._decay_s)

    def cost(self, inflight: int) -> float:
        """Estimated latency times (in-flight + 1): the number routing compares."""
        return max(self.value(), _COST_FLOOR_S) * (max(inflight, 0) + 1)

    def failure_sample(self) -> float:
        """The latency a failed request is observed as (see FAILURE_MIN_S)."""
        return max(FAILURE_MIN_S, min(2.0 * self._value, FAILURE_MAX_S))

    def __repr__(self) -> str:
        return f"PeakEwma(value={self.value():.6f}s, decay_s={self._decay_s})"


class _Entry:
    __slots__ = ("ewma", "inflight")

    def __init__(self, ewma: PeakEwma) -> None:
        self.ewma = ewma
        self.inflight = 0


class LoadTracker:
    """Per-backend in-flight counts and peak-EWMA time-to-first-byte: routing's LoadView."""

    def __init__(self, clock: Clock, decay_s: float, initial_s: float) -> None:
        # Validate once here rather than on the first lazily created entry.
        PeakEwma(clock, decay_s, initial_s)
        self._clock = clock
        self._decay_s = decay_s
        self._initial_s = initial_s
        self._entries: dict[str, _Entry] = {}

    def _entry(self, backend_id: str) -> _Entry:
        entry = self._entries.get(backend_id)
        if entry is None:
            entry = _Entry(PeakEwma(self._clock, self._decay_s, self._initial_s))
            self._entries[backend_id] = entry
        return entry

    def start(self, backend_id: str) -> None:
        """A request was sent to ``backend_id``."""
        self._entry(backend_id).inflight += 1

    def finish(self, backend_id: str, ttfb_s: float | None) -> None:
        """A request to ``backend_id`` ended; ``ttfb_s`` None means it failed before a head."""
        entry = self._entry(backend_id)
        entry.inflight = max(entry.inflight - 1, 0)
        if ttfb_s is None:
            entry.ewma.observe(entry.ewma.failure_sample())
        else:
            entry.ewma.observe(ttfb_s)

    def abandon(self, backend_id: str) -> None:
        """A request to ``backend_id`` was given up by our side (the client left): no sample."""
        entry = self._entry(backend_id)
        entry.inflight = max(entry.inflight - 1, 0)

    def cost(self, backend_id: str) -> float:
        """Lower is better; an unknown backend costs the initial estimate."""
        entry = self._entries.get(backend_id)
        if entry is None:
            # Reads do not create entries: only start/finish do, so the table grows with
            # backends actually used, not with every id anyone asked about.
            return max(self._initial_s, _COST_FLOOR_S)
        return entry.ewma.cost(entry.inflight)

    def inflight(self, backend_id: str) -> int:
        entry = self._entries.get(backend_id)
        return 0 if entry is None else entry.inflight

    def ewma_s(self, backend_id: str) -> float:
        """The latency estimate routing uses now, before the in-flight multiplier."""
        entry = self._entries.get(backend_id)
        return self._initial_s if entry is None else entry.ewma.value()

    def forget(self, backend_id: str) -> None:
        """Drop everything known about ``backend_id`` (it left the fleet)."""
        self._entries.pop(backend_id, None)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{bid}: {e.ewma.value() * 1000:.1f}ms x{e.inflight}"
            for bid, e in sorted(self._entries.items())
        )
        return f"LoadTracker(decay_s={self._decay_s}, {{{parts}}})"
