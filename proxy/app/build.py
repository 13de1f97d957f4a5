"""Composition root: the one place that builds pinproxy's objects and wires them.

Resources open in ``cleanup_ctx`` order (loop-lag monitor, HTTP clients, Redis client,
pin store, audit, traffic counts, discovery, control plane) and close in reverse, so
discovery stops before the client it polls with is closed and the store flushes its
batched work before the Redis client goes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import HttpVersion11, web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from proxy.config.settings import Settings
from proxy.core.clock import Clock, SystemClock
from proxy.core.errors import BadRequest, ProxyError
from proxy.core.ewma import LoadTracker
from proxy.core.models import Backend, Pin
from proxy.core.outlier import OutlierPolicy
from proxy.dataplane.health import Drain, HealthEndpoints
from proxy.dataplane.listener import EdgeOptions, EdgeServer
from proxy.dataplane.plane import DataPlane
from proxy.dataplane.relay import error_response
from proxy.fleet.control import ControlPlane, ControlStore, LocalControlStore
from proxy.fleet.control_redis import RedisControlStore
from proxy.fleet.discovery import Discovery
from proxy.fleet.registry import Registry
from proxy.fleet.rollout_control import (
    LocalRolloutStore,
    RedisRolloutStore,
    RolloutController,
    RolloutStore,
    SoakCounter,
)
from proxy.redis.client import sharded_pubsub_opener
from proxy.store import PinStore
from proxy.store.memory import MemoryPinStore
from proxy.store.redis import RedisPinStore
from proxy.store.redis_wire import redis_client_from_config
from proxy.telemetry.audit import AuditLog, AuditObserver, AuditRecord, DisabledAudit, MemoryAudit
from proxy.telemetry.audit_redis import RedisAudit
from proxy.telemetry.fleet_metrics import FleetCollector
from proxy.telemetry.loop_lag import LoopLagMonitor
from proxy.telemetry.metrics import ProxyMetrics
from proxy.telemetry.observers import Telemetry
from proxy.telemetry.traffic import TrafficCounter
from proxy.upstream.client import Upstream, make_client_session
from proxy.upstream.pool import Http1Pool
from proxy.upstream.tls import client_tls_context

if TYPE_CHECKING:
    from proxy.core.events import RequestObserver
    from proxy.store.redis_sync import ConflictHook

logger = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
CLOCK = web.AppKey("clock", Clock)
REGISTRY = web.AppKey("registry", Registry)
LOADS = web.AppKey("loads", LoadTracker)
METRICS = web.AppKey("metrics", ProxyMetrics)
FLEET_METRICS = web.AppKey("fleet_metrics", FleetCollector)  # gauges computed per scrape
TELEMETRY = web.AppKey("telemetry", Telemetry)  # metrics, request log and trace observers
HTTP = web.AppKey("http", aiohttp.ClientSession)
HTTP1 = web.AppKey("http1", Http1Pool)  # the lean client for held bodies
STORE = web.AppKey("store", PinStore)
DISCOVERY = web.AppKey("discovery", Discovery)
DATAPLANE = web.AppKey("dataplane", DataPlane)
AUDIT = web.AppKey("audit", AuditLog)
DRAIN = web.AppKey("drain", Drain)  # the server begins it on SIGTERM; readiness reads it
RNG = web.AppKey("rng", random.Random)
CONTROL = web.AppKey("control", ControlPlane)  # operators' fleet changes, shared by replicas
TRAFFIC = web.AppKey("traffic", TrafficCounter)  # production requests per region and version
EVAL_TRAFFIC = web.AppKey("eval_traffic", TrafficCounter)  # eval requests (evals.header)
LOOP_LAG = web.AppKey("loop_lag", LoopLagMonitor)  # how late the event loop runs timers
SOAK = web.AppKey("soak", SoakCounter)  # per region and version: what the soak judges
ROLLOUT = web.AppKey("rollout", RolloutController)  # region cutover, soak, kill switch

REDIS = web.AppKey("redis", Redis)  # only when store.kind == "redis"
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
SERVE: web.AppKey[Handler] = web.AppKey("serve")  # the one handler of the data port

StoreFactory = Callable[[Settings, Clock, "Redis | None", "ConflictHook"], PinStore]


def default_store(
    settings: Settings, clock: Clock, redis: Redis | None, on_conflict: ConflictHook
) -> PinStore:
    if redis is not None:
        return RedisPinStore(
            settings.store, redis, clock, owns_client=False, on_conflict=on_conflict
        )
    return MemoryPinStore(settings.store, clock)


def conflict_reporter(app: web.Application, clock: Clock) -> ConflictHook:
    """Counts, logs and audits a re-assertion conflict (the stored pin won)."""

    def report(session_id: str, ours: Pin, stored: Pin) -> None:
        change = f"{ours.version_key} -> {stored.version_key}"
        metrics = app[METRICS]
        metrics.pin_conflicts.labels(ours.version_key, stored.version_key).inc()
        metrics.version_switches.labels(
            "pin_conflict", ours.version_key, stored.version_key
        ).inc()
        logger.warning("re-asserted pin lost to the stored one: version %s", change)
        audit = app.get(AUDIT)
        if audit is not None:
            audit.offer(session_id, AuditRecord(
                at=clock.time(), request_id="-", trace_id="-", method="-", path="-",
                status=409, backend_id=stored.backend_id, region=stored.region,
                version_key=stored.version_key, latency_ms=0.0, version_changed=change,
                error_type="pin_conflict",
            ))  # fmt: skip

    return report


def default_audit(
    settings: Settings, clock: Clock, redis: Redis | None, metrics: ProxyMetrics
) -> AuditLog:
    """The audit log beside the pin store: in Redis when pins are, else in memory."""
    if not settings.audit.enabled:
        return DisabledAudit(settings.audit)
    if redis is not None:

        def dropped(reason: str, count: int) -> None:
            metrics.audit_dropped.labels(reason).inc(count)

        return RedisAudit(settings.audit, settings.store, redis, on_drop=dropped)
    return MemoryAudit(settings.audit, settings.store.pin_ttl_s, clock)


def build_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    metrics_registry: CollectorRegistry | None = None,
    metrics_multiprocess_dir: str | None = None,
    store_factory: StoreFactory = default_store,
    observers: Sequence[RequestObserver] = (),
) -> web.Application:
    """Build the data-plane application; nothing opens until the app starts.

    ``metrics_multiprocess_dir``: prometheus-client's multiprocess directory when this
    is one of several workers (the supervisor sets it), so /metrics sums them all.
    """
    clock = clock or SystemClock()
    rng = rng or random.Random()
    app = web.Application(client_max_size=1024**2)
    app[SETTINGS] = settings
    app[CLOCK] = clock
    configured = tuple(
        Backend(id=b.id, region=b.region, url=b.url, version_source=b.version_source)
        for b in settings.backends
    )
    app[METRICS] = metrics = ProxyMetrics(
        metrics_registry or CollectorRegistry(),
        settings.metrics,
        multiprocess_dir=metrics_multiprocess_dir,
    )
    app[REGISTRY] = Registry(
        configured,
        dimensions=settings.versions.dimensions,
        unhealthy_after=settings.discovery.unhealthy_after,
        healthy_after=settings.discovery.healthy_after,
        clock=clock,
        on_health_change=metrics.health_changed,
        outlier=OutlierPolicy(**settings.routing.outlier.model_dump()),
        on_ejection=lambda backend, region, why: metrics.outlier_ejections.labels(
            backend, region
        ).inc(),
    )
    app[FLEET_METRICS] = FleetCollector(app[REGISTRY])
    metrics.add_scrape_time(app[FLEET_METRICS])
    app[TELEMETRY] = telemetry = Telemetry(settings, metrics)
    observers = (*telemetry.observers, *observers)

    async def start_telemetry(app: web.Application) -> None:
        telemetry.start()

    async def close_telemetry(app: web.Application) -> None:
        # After cleanup_ctx has stopped the data plane: nothing more will be observed.
        # In a thread: exporting the last spans may wait on the network.
        await asyncio.to_thread(telemetry.close)

    app.on_startup.append(start_telemetry)
    app.on_cleanup.append(close_telemetry)
    app[LOADS] = LoadTracker(
        clock, settings.routing.ewma_decay_s, settings.routing.initial_latency_ms / 1000.0
    )
    app[DRAIN] = Drain()
    app[SOAK] = SoakCounter()
    app[RNG] = rng
    app[LOOP_LAG] = LoopLagMonitor(metrics.loop_lag.observe, clock=clock.monotonic)

    async def loop_lag(app: web.Application) -> AsyncIterator[None]:
        # First in, last out: it watches the loop for everything else's lifetime.
        app[LOOP_LAG].start()
        try:
            yield
        finally:
            app[LOOP_LAG].stop()

    async def http_client(app: web.Application) -> AsyncIterator[None]:
        tls = client_tls_context(settings.upstream)  # one trust policy for both clients
        pool = Http1Pool(settings.upstream, tls=tls)
        app[HTTP1] = pool
        try:
            async with make_client_session(settings.upstream, tls) as session:
                app[HTTP] = session
                yield
        finally:
            await pool.close()

    async def redis_client(app: web.Application) -> AsyncIterator[None]:
        # One client (one bounded pool) for everything that talks to Redis.
        if settings.store.kind != "redis":
            yield
            return
        client = redis_client_from_config(settings.store)
        app[REDIS] = client
        try:
            yield
        finally:
            await client.aclose()

    async def pin_store(app: web.Application) -> AsyncIterator[None]:
        store = store_factory(settings, clock, app.get(REDIS), conflict_reporter(app, clock))
        await store.start()
        app[STORE] = store
        try:
            yield
        finally:
            await store.close()

    async def audit(app: web.Application) -> AsyncIterator[None]:
        # After the pin store, so it closes (flushing its queue) before the Redis client.
        log = default_audit(settings, clock, app.get(REDIS), app[METRICS])
        await log.start()
        app[AUDIT] = log
        try:
            yield
        finally:
            await log.close()

    async def traffic(app: web.Application) -> AsyncIterator[None]:
        # Before discovery, which builds the data plane that feeds it; so it closes
        # (flushing its last counts) after the data plane stopped and before Redis.
        counters = [
            TrafficCounter(
                clock, redis=app.get(REDIS), key_prefix=settings.store.key_prefix,
                name=name, evals=evals, op_timeout_s=settings.store.op_timeout_ms / 1000,
            )
            for name, evals in (("traffic", False), ("traffic-evals", True))
        ]
        for counter in counters:
            await counter.start()
        app[TRAFFIC], app[EVAL_TRAFFIC] = counters
        try:
            yield
        finally:
            for counter in counters:
                await counter.close()

    async def discovery(app: web.Application) -> AsyncIterator[None]:
        found = Discovery(app[REGISTRY], app[HTTP], settings.discovery, rng)
        app[DISCOVERY] = found
        await found.start()
        app[DATAPLANE] = DataPlane(
            settings=settings,
            registry=app[REGISTRY],
            store=app[STORE],
            loads=app[LOADS],
            upstream=Upstream(app[HTTP], app[HTTP1]),
            metrics=app[METRICS],
            clock=clock,
            rng=rng,
            loop_lag=app[LOOP_LAG],
            probe=found.probe,
            observers=(*observers, app[TRAFFIC], app[EVAL_TRAFFIC], app[SOAK],
                       *((AuditObserver(app[AUDIT]),) if settings.audit.enabled else ())),
        )
        try:
            yield
        finally:
            await found.stop()

    async def rollout(app: web.Application) -> AsyncIterator[None]:
        # After the control plane, which its kill switch blocks versions through.
        redis = app.get(REDIS)
        store: RolloutStore = (
            LocalRolloutStore() if redis is None else RedisRolloutStore(
                redis, settings.store.key_prefix, clock, settings.store.op_timeout_ms / 1000
            )
        )
        control = app[CONTROL]
        controller = RolloutController(
            config=settings.rollout, registry=app[REGISTRY], store=store,
            counter=app[SOAK], block=lambda version: control.set_blocked(version, True),
            admit=lambda version: control.set_blocked(version, False),
            clock=clock, metrics_registry=metrics.registry,
        )
        await controller.start()
        app[ROLLOUT] = controller
        try:
            yield
        finally:
            await controller.close()

    async def control_plane(app: web.Application) -> AsyncIterator[None]:
        # After discovery, which it tells to poll added backends and forget removed
        # ones; closed first, so no change lands on a registry nobody polls any more.
        redis = app.get(REDIS)
        store: ControlStore = (
            LocalControlStore()
            if redis is None
            else RedisControlStore(
                redis, settings.store.key_prefix, clock, settings.store.op_timeout_ms / 1000,
                sharded=partial(sharded_pubsub_opener, settings.store, redis)
                if settings.store.topology == "cluster" else None,
            )
        )
        control = ControlPlane(
            configured=configured,
            registry=app[REGISTRY],
            discovery=app[DISCOVERY],
            loads=app[LOADS],
            store=store,
            clock=clock,
        )
        await control.start()
        app[CONTROL] = control
        try:
            yield
        finally:
            await control.close()

    app.cleanup_ctx.extend(
        [loop_lag, http_client, redis_client, pin_store, audit, traffic, discovery,
         control_plane, rollout]
    )

    health = HealthEndpoints(registry=app[REGISTRY], store=lambda: app.get(STORE),
                             drain=app[DRAIN])
    health_path, ready_path = settings.listen.health_path, settings.listen.ready_path

    async def serve(request: web.BaseRequest) -> web.StreamResponse:
        """Every data-port request: the health endpoints, else the data plane."""
        try:
            if request.headers.get("Expect") is not None:
                await _expect(request)
            path = request.path
            if path == health_path:
                return await health.healthz(request)
            if path == ready_path:
                return await health.readyz(request)
            if not path.startswith("/"):
                # Asterisk form (OPTIONS *) and authority form (CONNECT host:port) name
                # no resource to proxy, and a CONNECT must never open a tunnel.
                raise BadRequest(
                    f"{request.method} {path!r}: only a path can be proxied",
                    code="404",
                    status=404,
                )
            return await app[DATAPLANE].handle(request)
        except ProxyError as exc:
            return error_response(exc)
        except web.HTTPException as exc:
            # aiohttp's own refusals (e.g. 413) in the OpenAI error shape.
            return error_response(_http_error(exc))
        except Exception:
            # No traceback ever reaches a client: anything unexpected is a JSON 500.
            logger.exception("unexpected error handling %s %s", request.method, request.path)
            return error_response(ProxyError("internal error in pinproxy"))

    app[SERVE] = serve
    # For a plain AppRunner; DataPlaneRunner calls ``serve`` without the router.
    app.router.add_route("*", "/{tail:.*}", serve)
    return app


class DataPlaneRunner(web.AppRunner):
    """Runs ``build_app``'s application, handing requests straight to its one handler.

    Every data-port request goes to the same handler, so aiohttp's URL resolution,
    match info and middleware chain only cost time: skipping them saved about 10% of
    the CPU per request (bench throughput, one worker). Start-up and cleanup
    (cleanup_ctx) are the application's own, exactly as with ``web.AppRunner``.
    """

    async def _make_server(self) -> web.Server:
        await super()._make_server()  # starts the application and freezes it
        # BaseRunner keeps the keyword arguments given to it for the server it makes.
        # auto_decompress=False: a request body passes byte for byte, its
        # Content-Encoding with it (aiohttp would inflate a gzip body and forward the
        # plain bytes still labelled gzip, which the backend then fails to inflate).
        return EdgeServer(
            self.app[SERVE],
            options=EdgeOptions.data_port(self.app[SETTINGS]),
            metrics=self.app[METRICS],
            **{"auto_decompress": False, **self._kwargs},
        )


async def _expect(request: web.BaseRequest) -> None:
    """Answer ``Expect: 100-continue`` as aiohttp's router would (RFC 9110 §10.1.1).

    A client that sent it waits for the interim answer before sending its body, so
    without one the request would stall until the client gives up.
    """
    expect = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return  # HTTP/1.0 has no interim answers; the client sends its body anyway
    if expect.lower() != "100-continue":
        raise BadRequest(f"unknown expectation {expect!r}", code="417", status=417)
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim answer is not part of the response
    await request.writer.drain()


def _http_error(exc: web.HTTPException) -> ProxyError:
    if exc.status < 500:
        return BadRequest(exc.reason, code=str(exc.status), status=exc.status)
    return ProxyError(exc.reason, code=str(exc.status), status=exc.status)
