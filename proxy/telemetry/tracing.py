"""Optional OpenTelemetry spans: one per proxied request, exported over OTLP.

OpenTelemetry is an optional extra (``pip install 'pinproxy[otel]'``). Nothing in
this module imports it until ``build_tracing`` is called, which the composition
root does only when tracing is wanted (``TracingConfig.endpoint``): without it, no
OpenTelemetry code is loaded, let alone run per request.

Where pinproxy sits in the W3C trace. When a request arrives, ``upstream_traceparent``
decides with the configured sampler (the SDK's ``OTEL_TRACES_SAMPLER``, or
``tracing.sample_ratio``) whether pinproxy records a span for it:

* recorded: pinproxy's span gets a fresh span id, and the backend is told that id as
  its parent with the sampled flag (``01``): the backend's span is the child of
  pinproxy's, which is the child of the client's span (same trace id) or, without a
  client trace, the root;
* not recorded: a client's ``traceparent`` goes upstream unchanged (pinproxy is not
  in the trace), and a trace pinproxy starts is marked not sampled (``00``).

Spans are made after the fact, from each ``RequestEvent``, with the request's real
start and end times and the ids decided on arrival, so tracing adds no work while a
request is in flight. The span is started with the same sampler and the same inputs
(trace id, parent), which every built-in sampler decides alike.

Configuration is OpenTelemetry's own: the SDK and exporter read ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``/``_ARG``,
``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``/``HEADERS``/``TIMEOUT``/``COMPRESSION`` and
``OTEL_BSP_*``; a ``[tracing]`` setting, when given, wins over its variable. The
provider is private to the app (never installed as OpenTelemetry's global one) and its
batch processor exports from its own thread.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson

from proxy.core.answers import model_of
from proxy.core.headers import parse_traceparent

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

    from proxy.config.observability import TracingConfig
    from proxy.core.events import RequestEvent
    from proxy.telemetry.requestlog import SessionHasher

logger = logging.getLogger(__name__)

_SCOPE: Final = "pinproxy"
# gen_ai.operation.name by the OpenAI-compatible path a request was sent to.
_OPERATIONS: Final = (
    ("/chat/completions", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/responses", "chat"),
)


def operation_name(path: str) -> str | None:
    """``gen_ai.operation.name`` of a request to ``path``, if it is a GenAI call."""
    for suffix, name in _OPERATIONS:
        if path.endswith(suffix):
            return name
    return None


class _Presets(Protocol):
    def preset(self, trace_id: int | None, span_id: int | None) -> None: ...


class TracingObserver:
    """A ``RequestObserver`` that records one SERVER span per request."""

    def __init__(self, provider: TracerProvider, ids: _Presets, hasher: SessionHasher) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.trace.sampling import Decision
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
        )

        self._provider = provider
        self._tracer: Tracer = provider.get_tracer(_SCOPE)
        self._sampler = provider.sampler
        self._ids = ids  # the provider's id generator
        self._random = RandomIdGenerator()
        self._sample = Decision.RECORD_AND_SAMPLE
        self._hasher = hasher
        # Bound once here so observe() does no attribute lookups on modules.
        self._set_span_in_context = trace.set_span_in_context
        self._remote = NonRecordingSpan
        self._context = SpanContext
        self._flags = TraceFlags
        self._server = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)

    def upstream_traceparent(self, incoming: str | None, method: str) -> str:
        """The ``traceparent`` to send upstream for a request that carried ``incoming``.

        Decides, on arrival, whether this request's span is recorded (see the module
        docstring); ``observe`` reads the decision back from what was sent.
        """
        parsed = parse_traceparent(incoming)
        context: Context | None = None
        if parsed is not None:
            trace_id = int(parsed[0], 16)
            context = self._parent(parsed)
        else:
            trace_id = self._random.generate_trace_id()
        decision = self._sampler.should_sample(
            context, trace_id, f"pinproxy {method}", self._server
        )
        span_id = self._random.generate_span_id()
        if decision.decision is self._sample:
            return f"00-{trace_id:032x}-{span_id:016x}-01"
        if parsed is not None:
            assert incoming is not None
            return incoming  # not in the trace: the client's context passes as it came
        return f"00-{trace_id:032x}-{span_id:016x}-00"

    def observe(self, event: RequestEvent) -> None:
        sent = parse_traceparent(event.traceparent)
        # Recorded: sent sampled, with a span id of our own (else the client's went on).
        if sent is None or not int(sent[2], 16) & 1 or event.traceparent == (
            event.incoming_traceparent
        ):
            return
        trace_id, span_id = int(sent[0], 16), int(sent[1], 16)
        context = None
        incoming = parse_traceparent(event.incoming_traceparent)
        if incoming is not None and event.trace_continued:
            context = self._parent(incoming)
            self._ids.preset(None, span_id)
        else:
            self._ids.preset(trace_id, span_id)
        start = int(event.at * 1e9)
        try:
            span = self._tracer.start_span(
                f"pinproxy {event.method}",
                context=context,
                kind=self._server,
                attributes=self._attributes(event),
                start_time=start,
            )
        finally:
            self._ids.preset(None, None)
        if event.status >= 500:
            span.set_status(self._error)
        span.end(end_time=start + int(event.duration_s * 1e9))

    def _parent(self, parsed: tuple[str, str, str]) -> Context:
        trace_id, parent_id, flags = (int(part, 16) for part in parsed)
        remote = self._context(trace_id, parent_id, is_remote=True,
                               trace_flags=self._flags(flags & 1))
        return self._set_span_in_context(self._remote(remote))

    def _attributes(self, event: RequestEvent) -> dict[str, str | int | float | bool]:
        values: dict[str, str | int | float | bool | None] = {
            "http.request.method": event.method,
            "url.path": event.path,
            "http.response.status_code": event.status,
            "pinproxy.request_id": event.request_id,
            "pinproxy.prompt_version": event.prompt_version,
            "pinproxy.version_key": event.version_key,
            "pinproxy.region": event.region,
            "pinproxy.backend": event.backend_id,
            "pinproxy.session_hash": self._hasher(event.session_id),
            "pinproxy.new_pin": event.new_pin,
            "pinproxy.version_changed": event.version_changed,
            "pinproxy.ttfb_s": event.ttfb_s,
            "pinproxy.structured_output_valid": event.structured_output_valid,
            "error.type": event.error_type,
        }
        operation = operation_name(event.path)
        if operation is not None:
            # OpenTelemetry's GenAI semantic conventions, beside pinproxy's own.
            values["gen_ai.operation.name"] = operation
            values["gen_ai.request.model"] = _requested_model(event.request_body)
            values["gen_ai.response.model"] = event.response_model
        if event.usage is not None:
            values["gen_ai.usage.input_tokens"] = event.usage.prompt_tokens
            values["gen_ai.usage.output_tokens"] = event.usage.completion_tokens
        # OpenTelemetry attributes cannot be null: an unknown value is left out.
        return {k: v for k, v in values.items() if v is not None}

    def close(self) -> None:
        """Export what is buffered and stop the exporter thread."""
        logger.debug("tracing: flushing spans")
        self._provider.shutdown()

    def __repr__(self) -> str:
        return f"TracingObserver(provider={self._provider!r})"


def build_tracing(
    config: TracingConfig,
    hasher: SessionHasher,
    *,
    exporter: SpanExporter | None = None,
    batch: bool = True,
) -> TracingObserver:
    """The tracing observer for ``config`` (imports OpenTelemetry; call only when wanted).

    ``exporter`` replaces the OTLP exporter (tests pass an in-memory one, with
    ``batch=False`` so spans are exported as they end).
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # endpoint None: the exporter reads OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT itself,
        # as it reads its headers, timeout, compression and certificates.
        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint)
    # None: TracerProvider reads OTEL_TRACES_SAMPLER / _ARG (default parentbased_always_on).
    sampler = None if config.sample_ratio is None else ParentBased(
        root=TraceIdRatioBased(config.sample_ratio))
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; a configured
    # service_name wins, and "pinproxy" stands in for the SDK's "unknown_service".
    resource = Resource.create(
        {} if config.service_name is None else {"service.name": config.service_name})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "pinproxy"}))
    ids = _preset_ids()
    provider = TracerProvider(
        sampler=sampler, resource=resource, id_generator=ids, shutdown_on_exit=False
    )
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    return TracingObserver(provider, ids, hasher)


def _requested_model(body: bytes | None) -> str | None:
    """The ``model`` a held JSON request body asks for (parsed only for recorded spans)."""
    if not body or b'"model"' not in body:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return model_of(doc) if isinstance(doc, dict) else None


def _preset_ids() -> Any:
    """An id generator that hands out preset ids once (the proxy-started trace's ids)."""
    from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

    class PresetIds(IdGenerator):
        def __init__(self) -> None:
            self._random = RandomIdGenerator()
            self._trace_id: int | None = None
            self._span_id: int | None = None

        def preset(self, trace_id: int | None, span_id: int | None) -> None:
            # Set and used within one synchronous observe() call: no other span can
            # start in between on this thread, and spans are only started on it.
            self._trace_id, self._span_id = trace_id, span_id

        def generate_trace_id(self) -> int:
            return self._trace_id or self._random.generate_trace_id()

        def generate_span_id(self) -> int:
            return self._span_id or self._random.generate_span_id()

        def is_trace_id_random(self) -> bool:
            return True

        def __repr__(self) -> str:
            return "PresetIds()"

    return PresetIds()
