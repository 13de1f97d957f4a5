"""One OpenTelemetry span per request, placed in the request's W3C trace."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import aiohttp
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


async def test_a_span_per_request_with_version_attributes(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    exporter = InMemorySpanExporter()
    hasher = SessionHasher(b"k")
    tracing = build_tracing(TracingConfig(), hasher, exporter=exporter, batch=False)
    pop = await start_pop("us-east-1", "us-east", "v47", completion_tokens=3)
    proxy = await start_proxy([pop], observers=[tracing], routing={"pin_wait_ms": 50})
    # A client that traces: the proxy's span is a child of the client's.
    headers = {"X-Session-ID": "alice", "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"}
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT, headers=headers) as r:
        await r.read()
    # A client that does not: the proxy's span is the parent the backend was told about.
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers={"X-Session-ID": "bob"}) as r:
        await r.read()
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
    attributes = dict(first.attributes or {})
    assert attributes.pop("pinproxy.ttfb_s") > 0  # type: ignore[operator]
    assert attributes.pop("pinproxy.request_id")
    assert attributes.pop("gen_ai.usage.input_tokens") > 0  # type: ignore[operator]
    assert attributes == {
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",
        "http.response.status_code": 200,
        "pinproxy.prompt_version": "v47",
        "pinproxy.version_key": "prompt=v47",
        "pinproxy.region": "us-east",
        "pinproxy.backend": "us-east-1",
        "pinproxy.session_hash": hasher("alice"),
        "pinproxy.new_pin": True,
        "gen_ai.usage.output_tokens": 3,
    }
    assert first.start_time is not None
    assert first.end_time is not None
    assert 0 < first.end_time - first.start_time < 10 * 10**9
    assert first.resource.attributes["service.name"] == "pinproxy"

    # The backend got exactly the trace id and parent id of the proxy's root span.
    sent = pop.requests[-1].headers["traceparent"]
    _, trace_id, parent_id, _ = sent.split("-")
    assert second.parent is None
    assert (f"{second.context.trace_id:032x}", f"{second.context.span_id:016x}") == (
        trace_id, parent_id)
    assert dict(second.attributes or {})["pinproxy.session_hash"] == hasher("bob")

    assert failed.status.status_code is StatusCode.ERROR
    assert dict(failed.attributes or {})["error.type"] == "version_unavailable"
    assert "pinproxy.backend" not in dict(failed.attributes or {})


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


async def test_spans_reach_an_otlp_endpoint(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    # The 'otel' extra is part of the test extra, so this never silently skips.
    import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
    received: list[bytes] = []

    async def collector(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=200, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collector)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        pop = await start_pop("us-east-1", "us-east", "v47")
        proxy = await start_proxy(
            [pop], tracing={"otlp_endpoint": f"http://127.0.0.1:{port}/v1/traces",
                            "service_name": "edge-test"})
        async with http.get(f"{proxy.url}/ping", headers={"X-Session-ID": "carol"}) as r:
            assert r.status == 200
        # The batch processor exports from its own thread; shutting down flushes it.

        tracing = proxy.services.telemetry.tracing
        assert tracing is not None
        await asyncio.to_thread(tracing.close)
        assert len(received) == 1
        assert b"edge-test" in received[0]
        assert b"pinproxy.version_key" in received[0]
        assert b"prompt=v47" in received[0]
    finally:
        await runner.cleanup()
