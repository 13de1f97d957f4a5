"""Keeping Python's cyclic garbage collector out of the request path, and measuring it.

The collector runs inside whatever allocation trips its threshold, holding the event
loop for as long as it walks the generation: every request in flight waits. A full
collection walks every live container, so its pause grows with the number of streams
in flight (measured: bench/RESULTS.md, the GC row). ``tune_gc``
freezes what start-up allocated (it lives as long as the process and would be walked
by every full collection) and applies the configured thresholds; ``GcPauses`` reports
each collection's duration, so a tail-latency spike can be told from a GC pause.
"""

from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.config.settings import RuntimeConfig

GENERATIONS: Final = ("0", "1", "2")


def tune_gc(config: RuntimeConfig) -> None:
    """Apply the thresholds; freeze everything allocated so far when configured.

    Call once start-up is done: what is frozen is never collected, so it must be what
    lives as long as the process.
    """
    gc.set_threshold(*config.gc_thresholds)
    if config.gc_freeze_after_start:
        gc.collect()  # do not freeze garbage that start-up left behind
        gc.freeze()


class GcPauses:
    """A ``gc.callbacks`` hook reporting each collection's duration and generation."""

    def __init__(
        self, observe: Callable[[str, float], None], clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self._observe = observe
        self._clock = clock
        self._started = 0.0
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        self._observe(GENERATIONS[info["generation"]], self._clock() - self._started)

    def __repr__(self) -> str:
        return f"GcPauses(installed={self._installed})"
