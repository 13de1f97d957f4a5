"""One WARNING per outage: a background loop that fails every tick says so once.

A Redis restart or failover makes every periodic writer (TTL touches, traffic counts,
the control subscription) fail several times a second until it is back. Those are
expected, and one line each is what an operator needs: when it began (WARNING, with
the first error) and when it ended (INFO).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging


class OutageLog:
    """Logs the first failure of a run of failures, and the first success after it."""

    __slots__ = ("_down", "_logger", "_what", "failures")

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._down = False
        self.failures = 0  # failures in the current run

    @property
    def down(self) -> bool:
        return self._down

    def failed(self, detail: str) -> None:
        self.failures += 1
        if not self._down:
            self._down = True
            self._logger.warning("%s failing (logged once until it works again): %s",
                                 self._what, detail)

    def succeeded(self) -> None:
        if self._down:
            self._logger.info("%s works again after %d failures", self._what, self.failures)
        self._down = False
        self.failures = 0

    def __repr__(self) -> str:
        return f"OutageLog({self._what!r}, down={self._down}, failures={self.failures})"
