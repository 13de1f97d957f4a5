"""What the data plane tells the rest of the system about each finished request.

The data plane builds one ``RequestEvent`` per request and hands it to every
``RequestObserver`` (audit trail, metrics, logs, traces). Observers run inline, so
they must only do cheap in-memory work: anything that needs I/O goes through a
bounded queue that a background task drains (invariant 4: nothing on the hot path
waits on work that can happen later).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.models import prompt_of


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts from the OpenAI ``usage`` object of a response, when it had one."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class RequestEvent:
    at: float  # wall-clock seconds when the request arrived
    request_id: str
    trace_id: str
    session_id: str | None
    method: str
    path: str
    status: int
    backend_id: str | None  # None when no backend answered (e.g. 503 before sending)
    region: str | None
    version_key: str | None  # the version that served the answer, or the pinned one on 503
    new_pin: bool  # this request created the session's pin
    version_changed: str | None  # "old -> new" when this request repinned the session
    duration_s: float  # until the last byte was sent (or the error answered)
    ttfb_s: float | None  # upstream time to first byte
    error_type: str | None  # the OpenAI error type pinproxy answered with, if it did
    streamed: bool = False
    usage: Usage | None = None
    # For requests that asked for JSON output: did the answer parse? None: not asked.
    structured_output_valid: bool | None = None
    # The W3C traceparent sent upstream, and whether the client sent it (else the proxy
    # started the trace): what a tracing observer needs to place its span.
    traceparent: str | None = None
    trace_continued: bool = False

    @property
    def prompt_version(self) -> str | None:
        return None if self.version_key is None else prompt_of(self.version_key)


class RequestObserver(Protocol):
    def observe(self, event: RequestEvent) -> None:
        """Take note of a finished request. Must not block, await or raise."""
        ...
