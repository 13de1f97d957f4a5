"""Outlier detection: eject a backend that keeps failing, in the spirit of Envoy's.

Theory of operation. Every answered or failed request reports ``ok`` or not for its
backend (a 5xx head, a timeout, a broken head, a refused or dropped connection are
failures). ``consecutive_failures`` in a row eject the backend for
``base_ejection_s`` times the number of times it has been ejected (so a backend that
keeps coming back broken stays out longer), capped at ``max_ejection_s``. When the
ejection ends the backend is back on probation: a single failure ejects it again,
while ``consecutive_failures`` successes in a row end the probation and forget its
past ejections. At most ``max_ejected_percent`` of a version's backends are ejected at
once (rounded down): outlier detection must never be what makes a pinned session's
version unavailable, so the last backend of a version is never ejected for answering
errors; the client gets the backend's own error instead.

Pure: the registry owns one ``OutlierState`` per backend, passes the time in and
decides the share cap (it knows each version's backends).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    enabled: bool = True
    consecutive_failures: int = 5
    base_ejection_s: float = 10.0
    max_ejection_s: float = 300.0
    max_ejected_percent: int = 50

    def allowed(self, backends_of_version: int) -> int:
        """How many of a version's backends may be ejected at once."""
        return backends_of_version * self.max_ejected_percent // 100


@dataclass(slots=True)
class OutlierState:
    failures: int = 0  # consecutive
    successes: int = 0  # consecutive, on probation
    ejections: int = 0  # since the last completed probation
    ejected_until: float = 0.0

    def record(self, ok: bool, now: float, policy: OutlierPolicy) -> bool:
        """Take in one result; True when the backend should be ejected now."""
        if not policy.enabled:
            return False
        if ok:
            self.failures = 0
            if self.ejections and now >= self.ejected_until:
                self.successes += 1
                if self.successes >= policy.consecutive_failures:
                    self.ejections = 0  # probation passed
                    self.successes = 0
            return False
        self.successes = 0
        if now < self.ejected_until:
            return False  # already out (a request that started before the ejection)
        self.failures += 1
        threshold = 1 if self.ejections else policy.consecutive_failures
        return self.failures >= threshold

    def eject(self, now: float, policy: OutlierPolicy) -> float:
        """Eject from ``now``; return until when."""
        self.ejections += 1
        self.failures = 0
        self.ejected_until = now + min(policy.base_ejection_s * self.ejections,
                                       policy.max_ejection_s)
        return self.ejected_until
