"""Outcome.event: every field of the event is the one of the same name."""

from __future__ import annotations

import dataclasses

from proxy.core.events import Outcome, RequestEvent, Usage


def test_the_event_has_each_value_under_its_own_name() -> None:
    # Outcome.event builds the event positionally (it is on every request's path): a
    # distinct value per field, compared by name, catches any two fields swapped.
    usage = Usage(prompt_tokens=3, completion_tokens=4)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    outcome = Outcome(
        session_id="session", status=201, backend_id="backend", region="region",
        version_key="prompt=v1", new_pin=True, version_changed="prompt=v0 -> prompt=v1",
        ttfb_s=0.25, error_type="error", streamed=True, request_body=b"body",
        extra_headers=[("x", "y")], usage=usage, structured_output_valid=False,
        response_model="model", client="10.0.0.9",
    )
    event = outcome.event(
        at=12.5, request_id="request", traceparent=traceparent,
        incoming_traceparent="00-incoming-01", method="PUT", path="/path",
        duration_s=0.75, eval_run=True,
    )
    assert dataclasses.asdict(event) == {
        "at": 12.5, "request_id": "request", "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "session_id": "session", "method": "PUT", "path": "/path", "status": 201,
        "backend_id": "backend", "region": "region", "version_key": "prompt=v1",
        "new_pin": True, "version_changed": "prompt=v0 -> prompt=v1", "duration_s": 0.75,
        "ttfb_s": 0.25, "error_type": "error", "streamed": True,
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        "structured_output_valid": False, "traceparent": traceparent,
        "incoming_traceparent": "00-incoming-01", "request_body": b"body",
        "response_model": "model", "client": "10.0.0.9", "eval_run": True,
    }
    assert event.usage is usage
    # Every field of the event is set from the outcome or the arguments, none left over.
    assert len(dataclasses.fields(RequestEvent)) == 24


def test_an_untouched_outcome_makes_the_default_event() -> None:
    event = Outcome().event(at=1.0, request_id="r", traceparent="00-" + "a" * 32 + "-b-01",
                            incoming_traceparent=None, method="GET", path="/",
                            duration_s=0.0)
    assert (event.status, event.session_id, event.usage, event.eval_run) == (
        499, None, None, False)
    assert event.trace_id == "a" * 32
