"""The retry budget: how many requests may be replaying at once, fleet-wide in one process.

Theory of operation. A replay of a request that was written and then dropped is extra
load on a fleet that may already be failing; unbounded, replays turn a brownout into a
retry storm. So, in the spirit of Envoy's retry budget, replays are allowed while
fewer than ``percent`` of the active requests, or ``min_concurrency``, are retrying,
whichever is more. The counts are plain integers kept by the data plane (``active``
for each request in the handler, plane.py; ``retrying`` from a request's first
budgeted retry to its end, executor.py); the lifecycle reads only ``has_room()``,
through its ``World``, so its decisions stay pure.
"""

from __future__ import annotations


class RetryBudget:
    """How many requests may be replaying at once, in the spirit of Envoy's budget.

    Replays of written requests are allowed while fewer than ``percent`` of the active
    requests, or ``min_concurrency``, are retrying, whichever is more; so a failing
    fleet gets a bounded amount of extra load, never a retry storm.
    """

    __slots__ = ("_min", "_share", "active", "retrying")

    def __init__(self, percent: float, min_concurrency: int) -> None:
        self._share = percent / 100
        self._min = min_concurrency
        self.active = 0
        self.retrying = 0

    def has_room(self) -> bool:
        return self.retrying < max(self._min, self.active * self._share)

    def reconfigure(self, percent: float, min_concurrency: int) -> None:
        """New limits (a config reload); the counts of requests in flight carry over."""
        self._share = percent / 100
        self._min = min_concurrency

    def __repr__(self) -> str:
        return f"RetryBudget(active={self.active}, retrying={self.retrying})"
