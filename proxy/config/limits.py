"""Settings of admission control (``limits``): how much work the data port takes on.

A section of ``proxy.config.Settings`` (which re-exports it); the decisions are
proxy/core/admission.py's. The defaults shed nothing at loads this process can serve
(thousands of requests or streams in flight), only what it could not: a burst past
them waits in a short queue, and what still does not fit is answered
``503 proxy_overloaded`` at once, before it can slow everyone else down.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from proxy.config.observability import Section
from proxy.core.admission import AdmissionLimits


class LimitsConfig(Section):
    # Requests running the data plane's handler at once, per process (each worker
    # has its own) (a stream counts until its end, and is never cut by admission);
    # 0: no limit. Health and readiness checks
    # and the admin listener are never counted nor shed.
    max_in_flight: Annotated[int, Field(ge=0, le=1_000_000)] = 4096
    # Arrivals that wait, first come first served, for a slot while max_in_flight are
    # running; beyond it an arrival is shed at once (reason queue_full).
    queue: Annotated[int, Field(ge=0, le=1_000_000)] = 1024
    # How long one may wait in the queue before it is shed (reason queue_timeout).
    queue_timeout_ms: Annotated[int, Field(ge=1, le=600_000)] = 1000
    # Shed arrivals while the event loop runs at least this late (reason loop_lag):
    # then the process is saturated whatever the counts say. 0: off. Below
    # store.op_timeout_ms / 2, the door refuses before pin-store calls would time out
    # on the late loop (answered proxy_overloaded by the data plane).
    max_loop_lag_ms: Annotated[int, Field(ge=0, le=60_000)] = 0

    def admission(self) -> AdmissionLimits:
        """These settings as the admission state machine's limits."""
        return AdmissionLimits(
            max_in_flight=self.max_in_flight,
            queue=self.queue,
            queue_timeout_s=self.queue_timeout_ms / 1000,
            max_loop_lag_s=self.max_loop_lag_ms / 1000,
        )
