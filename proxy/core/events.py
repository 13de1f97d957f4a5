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

from proxy.core.models import prompt_of

# Usage and RequestEvent are made once per request and never changed after: they are
# plain (not frozen) slotted dataclasses, because a frozen one's __init__ sets each field
# through object.__setattr__, which made a RequestEvent cost 4x as much to build (2.9 µs
# against 0.7 µs; bench/RESULTS.md, issue 14 telemetry round). Nothing may assign to
# their fields: observers share one event.


@dataclass(slots=True)
class Usage:
    """Token counts from the OpenAI ``usage`` object of a response, when it had one."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
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
    # The W3C traceparent sent upstream and the one the client sent (None: none, or
    # not a valid one): what a tracing observer needs to place its span.
    traceparent: str | None = None
    incoming_traceparent: str | None = None
    # The held request body (None when it streamed): the tracing observer reads the
    # requested model from it, only for a span it records.
    request_body: bytes | None = None
    response_model: str | None = None  # the model the answer named, when it named one
    client: str | None = None  # the client's address, as resolved (forwarded.py)
    # The request carried the eval header (``evals.header``): eval traffic, counted
    # apart from production (proxy/telemetry/eval_coverage.py).
    eval_run: bool = False

    @property
    def trace_continued(self) -> bool:
        """Whether the request continued the client's trace (same trace id upstream)."""
        incoming, sent = self.incoming_traceparent, self.traceparent
        return incoming is not None and sent is not None and incoming[3:35] == sent[3:35]

    @property
    def prompt_version(self) -> str | None:
        return None if self.version_key is None else prompt_of(self.version_key)


class RequestObserver(Protocol):
    def observe(self, event: RequestEvent) -> None:
        """Take note of a finished request. Must not block, await or raise."""
        ...


@dataclass(slots=True)
class Outcome:
    """What happened to one request, filled in along the request path for its event."""

    session_id: str | None = None
    status: int = 499  # until something is answered: the client went away
    backend_id: str | None = None
    region: str | None = None
    version_key: str | None = None
    new_pin: bool = False
    version_changed: str | None = None
    ttfb_s: float | None = None
    error_type: str | None = None
    streamed: bool = False
    request_body: bytes | None = None  # held body, for the response tap to read
    extra_headers: list[tuple[str, str]] | None = None  # added to the answer (pin token)
    usage: Usage | None = None
    structured_output_valid: bool | None = None
    response_model: str | None = None
    client: str | None = None

    def event(
        self,
        *,
        at: float,
        request_id: str,
        traceparent: str,
        incoming_traceparent: str | None,
        method: str,
        path: str,
        duration_s: float,
        eval_run: bool = False,
    ) -> RequestEvent:
        # Positional, in RequestEvent's field order: keyword arguments made building an
        # event cost about twice as much (24 names matched per call).
        return RequestEvent(
            at,
            request_id,
            traceparent[3:35],  # trace_id: always a valid one (headers.parse_traceparent)
            self.session_id,
            method,
            path,
            self.status,
            self.backend_id,
            self.region,
            self.version_key,
            self.new_pin,
            self.version_changed,
            duration_s,
            self.ttfb_s,
            self.error_type,
            self.streamed,
            self.usage,
            self.structured_output_valid,
            traceparent,
            incoming_traceparent,
            self.request_body,
            self.response_model,
            self.client,
            eval_run,
        )

