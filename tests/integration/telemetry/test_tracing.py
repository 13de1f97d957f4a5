"""One OpenTelemetry span per request, placed in the request's W3C trace."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy.config.observability import TracingConfig
from proxy.core.models import VersionBundle
from proxy.telemetry.requestlog import SessionHasher
from proxy.telemetry.tracing import build_tracing
from tests.fixtures.proxy import StartProxy, free_port
from tests.fixtures.sim import StartPop
from tests.integration.telemetry.test_metrics import wait_for

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}],
        "stream": True, "stream_options": {"include_usage": True}}
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = "b7ad6b7169203331"


def _in_memory(hasher: SessionHasher, **config: object) -> tuple[InMemorySpanExporter, Any]:
    exporter = InMemorySpanExporter()
    tracing = build_tracing(TracingConfig.model_validate(config), hasher, exporter=exporter,
                            batch=False)
    return exporter, tracing


async def test_a_span_per_request_with_version_and_genai_attributes(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    hasher = SessionHasher(b"k")
    exporter, tracing = _in_memory(hasher)
    pop = await start_pop("us-east-1", "us-east", "v47", completion_tokens=3,
                          model="m-2026")
    proxy = await start_proxy([pop], tracing=tracing, routing={"pin_wait_ms": 50})
    # A client that traces: the proxy's span is a child of the client's.
    headers = {"X-Session-ID": "alice", "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"}
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT, headers=headers) as r:
        await r.read()
    continued = pop.requests[-1].headers["traceparent"]
    # A client that does not: the proxy's span is the root, and the backend's parent.
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers={"X-Session-ID": "bob"}) as r:
        await r.read()
    started = pop.requests[-1].headers["traceparent"]
    # A 503 is an error span.
    pop.flip(VersionBundle(prompt="v48"))
    await wait_for(lambda: "prompt=v47" not in proxy.registry.snapshot.by_key)
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers={"X-Session-ID": "alice"}) as r:
        assert r.status == 503
    tracing.close()

    first, second, failed = exporter.get_finished_spans()
    assert first.name == "pinproxy POST"
    assert first.kind is SpanKind.SERVER
    assert f"{first.context.trace_id:032x}" == CLIENT_TRACE
    assert first.parent is not None
    assert f"{first.parent.span_id:016x}" == CLIENT_PARENT
    assert first.parent.is_remote
    assert f"{first.context.span_id:016x}" != CLIENT_PARENT
    # The backend was told pinproxy's span as its parent, sampled: its span nests under it.
    assert continued == f"00-{CLIENT_TRACE}-{first.context.span_id:016x}-01"
    attributes = dict(first.attributes or {})
    assert attributes.pop("pinproxy.ttfb_s") > 0  # type: ignore[operator]
    assert attributes.pop("pinproxy.request_id")
    assert attributes.pop("gen_ai.usage.input_tokens") > 0  # type: ignore[operator]
    assert attributes == {
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",
        "http.response.status_code": 200,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "sim",
        "gen_ai.response.model": "m-2026",
        "gen_ai.usage.output_tokens": 3,
        "pinproxy.prompt_version": "v47",
        "pinproxy.version_key": "prompt=v47,model=m-2026",
        "pinproxy.region": "us-east",
        "pinproxy.backend": "us-east-1",
        "pinproxy.session_hash": hasher("alice"),
        "pinproxy.new_pin": True,
    }
    assert first.start_time is not None
    assert first.end_time is not None
    assert 0 < first.end_time - first.start_time < 10 * 10**9
    assert first.resource.attributes["service.name"] == "pinproxy"

    # A trace pinproxy started: the backend got its trace id and span id, sampled.
    assert second.parent is None
    assert started == (
        f"00-{second.context.trace_id:032x}-{second.context.span_id:016x}-01")
    assert dict(second.attributes or {})["pinproxy.session_hash"] == hasher("bob")

    assert failed.status.status_code is StatusCode.ERROR
    assert dict(failed.attributes or {})["error.type"] == "version_unavailable"
    assert "pinproxy.backend" not in dict(failed.attributes or {})


async def test_an_unsampled_client_trace_passes_unchanged_and_records_no_span(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    exporter, tracing = _in_memory(SessionHasher(b"k"))
    pop = await start_pop("us-east-1", "us-east", "v47")
    proxy = await start_proxy([pop], tracing=tracing)
    unsampled = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-00"
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers={"traceparent": unsampled}) as r:
        assert r.status == 200
        await r.read()
    tracing.close()
    assert pop.requests[-1].headers["traceparent"] == unsampled
    assert exporter.get_finished_spans() == ()


async def test_the_sampler_and_service_name_come_from_otel_variables(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-from-env")
    exporter, off = _in_memory(SessionHasher(b"k"))
    pop = await start_pop("us-east-1", "us-east", "v47")
    proxy = await start_proxy([pop], tracing=off)
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as r:
        await r.read()
    off.close()
    assert exporter.get_finished_spans() == ()
    # Never sampled, so never told to the backend as sampled.
    assert pop.requests[-1].headers["traceparent"].endswith("-00")

    # A configured ratio wins over the variable; the service name comes from it.
    exporter, on = _in_memory(SessionHasher(b"k"), sample_ratio=1.0)
    proxy = await start_proxy([pop], tracing=on)
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as r:
        await r.read()
    on.close()
    (span,) = exporter.get_finished_spans()
    assert span.resource.attributes["service.name"] == "edge-from-env"
    assert pop.requests[-1].headers["traceparent"].endswith(f"{span.context.span_id:016x}-01")


@pytest.mark.parametrize(
    ("config", "environ", "expected"),
    [
        ({}, {}, None),
        ({"otlp_endpoint": "http://c:4318/v1/traces"}, {}, "http://c:4318/v1/traces"),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
              "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/x"}, "http://t:4318/x"),
        ({"otlp_endpoint": "http://c:4318/v1/traces"}, {"OTEL_SDK_DISABLED": "true"}, None),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
              "OTEL_TRACES_EXPORTER": "none"}, None),
    ],
)
def test_tracing_is_on_when_an_endpoint_is_configured_or_in_otel_variables(
    config: dict[str, str], environ: dict[str, str], expected: str | None
) -> None:
    assert TracingConfig(**config).endpoint(environ) == expected


def test_without_an_endpoint_opentelemetry_is_never_imported() -> None:
    script = textwrap.dedent(
        """
        import asyncio
        import sys
        from proxy.app.services import open_services
        from proxy.config.settings import Settings

        async def check() -> None:
            async with open_services(Settings()) as services:
                assert services.telemetry.tracing is None

        asyncio.run(check())
        # redis-py >= 8 loads OpenTelemetry's *metrics* API by itself when it is
        # installed; pinproxy's tracing, the tracing SDK and exporters stay unloaded.
        ours = ("proxy.telemetry.tracing", "opentelemetry.sdk.trace", "opentelemetry.exporter")
        loaded = sorted(m for m in sys.modules if m.startswith(ours))
        assert not loaded, loaded
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr


async def test_spans_reach_a_real_otlp_receiver_configured_by_otel_variables(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The 'otel' extra is part of the test extra, so this never silently skips.
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    received: list[ExportTraceServiceRequest] = []

    async def collector(request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        received.append(export)
        return web.Response(status=200, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collector)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    # Nothing in [tracing]: OpenTelemetry's own variables turn it on and name it.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-test")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=ci")
    try:
        pop = await start_pop("us-east-1", "us-east", "v47")
        proxy = await start_proxy([pop])
        headers = {"X-Session-ID": "carol",
                   "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"}
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                             headers=headers) as r:
            assert r.status == 200
            await r.read()
        # The batch processor exports from its own thread; shutting down flushes it.

        tracing = proxy.services.telemetry.tracing
        assert tracing is not None
        await asyncio.to_thread(tracing.close)
        spans = [(rs, span) for export in received for rs in export.resource_spans
                 for ss in rs.scope_spans for span in ss.spans]
        assert len(spans) == 1
        resource_spans, span = spans[0]
        resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        assert resource["service.name"] == "edge-test"
        assert resource["deployment.environment"] == "ci"
        attributes = {a.key: a.value for a in span.attributes}
        assert attributes["pinproxy.version_key"].string_value == "prompt=v47"
        assert attributes["gen_ai.operation.name"].string_value == "chat"
        assert attributes["gen_ai.request.model"].string_value == "sim"
        assert attributes["gen_ai.response.model"].string_value == "sim-model"
        assert attributes["gen_ai.usage.output_tokens"].int_value > 0
        # Client span -> pinproxy's span -> the backend, by the ids on the wire.
        assert span.trace_id.hex() == CLIENT_TRACE
        assert span.parent_span_id.hex() == CLIENT_PARENT
        sent = pop.requests[-1].headers["traceparent"]
        assert sent == f"00-{CLIENT_TRACE}-{span.span_id.hex()}-01"
    finally:
        await runner.cleanup()
