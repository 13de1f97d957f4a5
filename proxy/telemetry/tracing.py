"""Optional OpenTelemetry spans: one per proxied request, exported over OTLP.

OpenTelemetry is an optional extra (``pip install 'pinproxy[otel]'``). Nothing in
this module imports it until ``build_tracing`` is called, which the composition
root does only when ``tracing.otlp_endpoint`` is configured: without it, no
OpenTelemetry code is loaded, let alone run per request.

Spans are made after the fact, from each ``RequestEvent``, with the request's real
start and end times, so tracing adds no work while a request is in flight. The
span joins the W3C trace the request carried upstream:

* when the client sent a ``traceparent``, the span is its child (the backend got the
  same ``traceparent``, so its spans are the proxy span's siblings);
* when the proxy started the trace, the span *is* the parent the backend was told
  about: it takes the trace id and parent id the proxy sent upstream, so the
  backend's spans nest under it.

The provider is private to the app (never installed as OpenTelemetry's global one)
and its batch processor exports from its own thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol

from proxy.core.headers import parse_traceparent

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

    from proxy.config.observability import TracingConfig
    from proxy.core.events import RequestEvent
    from proxy.telemetry.requestlog import SessionHasher

_SCOPE: Final = "pinproxy"


class _Presets(Protocol):
    def preset(self, trace_id: int | None, span_id: int | None) -> None: ...


class TracingObserver:
    """A ``RequestObserver`` that records one SERVER span per request."""

    def __init__(self, provider: TracerProvider, ids: _Presets, hasher: SessionHasher) -> None:
        from opentelemetry import trace
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
        self._ids = ids  # the provider's id generator
        self._hasher = hasher
        # Bound once here so observe() does no attribute lookups on modules.
        self._set_span_in_context = trace.set_span_in_context
        self._remote = NonRecordingSpan
        self._context = SpanContext
        self._flags = TraceFlags
        self._server = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)

    def observe(self, event: RequestEvent) -> None:
        parsed = parse_traceparent(event.traceparent)
        context = None
        if parsed is not None:
            trace_id, parent_id, flags = (int(part, 16) for part in parsed)
            if event.trace_continued:
                remote = self._context(
                    trace_id, parent_id, is_remote=True, trace_flags=self._flags(flags)
                )
                context = self._set_span_in_context(self._remote(remote))
            else:
                self._ids.preset(trace_id, parent_id)
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
        if event.usage is not None:
            values["gen_ai.usage.input_tokens"] = event.usage.prompt_tokens
            values["gen_ai.usage.output_tokens"] = event.usage.completion_tokens
        # OpenTelemetry attributes cannot be null: an unknown value is left out.
        return {k: v for k, v in values.items() if v is not None}

    def close(self) -> None:
        """Export what is buffered and stop the exporter thread."""
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
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint)
    ratio = TraceIdRatioBased(config.sample_ratio)
    # A client that sampled its trace gets the proxy's span too; otherwise the ratio.
    sampler = ParentBased(root=ratio, remote_parent_sampled=ALWAYS_ON,
                          remote_parent_not_sampled=ratio)
    ids = _preset_ids()
    provider = TracerProvider(
        sampler=sampler,
        resource=Resource.create({"service.name": config.service_name}),
        id_generator=ids,
        shutdown_on_exit=False,
    )
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    return TracingObserver(provider, ids, hasher)


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
