"""Composition root: the one place that builds pinproxy's services and wires them.

``open_services`` builds every object once, opens the ones that hold resources on an
``AsyncExitStack`` and yields a frozen :class:`Services`. Closing the stack closes them
in reverse order of opening, and that order is the point of this module:

1. telemetry (closed last: spans of the final requests are still exported);
2. the loop-lag monitor (watches the loop for everything else's lifetime);
3. the HTTP clients (discovery polls with them, the data plane sends with them);
4. the Redis client (one bounded pool for everything that talks to Redis);
5. the pin store (closes, flushing batched TTL touches, before the Redis client);
6. the audit log (flushes its queue before the Redis client goes);
7. traffic counts, production and eval (flush their last counts after the data plane
   stopped);
8. discovery, which the data plane is built on (stopped before the clients close);
9. the control plane (closed before discovery, so no change lands on a registry
   nobody polls any more);
10. the rollout controller (blocks versions through the control plane);
11. the reloader (opens nothing: it steers the data plane and the control plane).

The listeners are not here: the runtime starts them over ``Services`` and stops them
(draining in-flight requests) before it closes the stack.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from proxy.app.known_series import export_backend_series, export_known_series
from proxy.app.reload import Reloader
from proxy.config.settings import Settings
from proxy.core.admission import SHED_REASONS
from proxy.core.clock import Clock, SystemClock
from proxy.core.ewma import LoadTracker
from proxy.core.outlier import OutlierPolicy
from proxy.dataplane.admission_gate import AdmissionGate
from proxy.dataplane.health import Drain
from proxy.dataplane.plane import DataPlane
from proxy.fleet.control import ControlPlane, ControlStore, LocalControlStore
from proxy.fleet.control_redis import RedisControlStore
from proxy.fleet.discovery import Discovery
from proxy.fleet.registry import Registry
from proxy.fleet.rollout_control import RolloutController
from proxy.fleet.rollout_soak import SoakCounter
from proxy.fleet.rollout_store import LocalRolloutStore, RedisRolloutStore, RolloutStore
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
    import aiohttp
    from redis.asyncio import Redis

    from proxy.core.events import RequestObserver
    from proxy.core.models import Backend, Pin
    from proxy.redis.metrics import RedisMetrics
    from proxy.store.redis_sync import ConflictHook
    from proxy.telemetry.tracing import TracingObserver

logger = logging.getLogger(__name__)

# How far back admission looks for event-loop lag (limits.max_loop_lag_ms): a few of
# the monitor's 50 ms ticks.
LOOP_LAG_WINDOW_S = 0.25

StoreFactory = Callable[
    [Settings, Clock, "Redis | None", "ConflictHook", "RedisMetrics"], PinStore
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Services:
    """Everything one proxy process runs on, built once by :func:`open_services`.

    The data port's handler and the admin API are given this object; nothing looks
    services up by name.
    """

    settings: Settings
    clock: Clock
    rng: random.Random
    metrics: ProxyMetrics
    fleet_metrics: FleetCollector  # gauges computed per scrape
    telemetry: Telemetry  # metrics, request log and trace observers
    registry: Registry
    loads: LoadTracker
    drain: Drain  # the runtime begins it on SIGTERM; readiness reads it
    soak: SoakCounter  # per region and version: what the soak judges
    loop_lag: LoopLagMonitor
    http: aiohttp.ClientSession  # the /version polls only
    http1: Http1Pool  # the one client for proxied requests
    redis: Redis | None  # only when store.kind == "redis"
    store: PinStore
    audit: AuditLog
    traffic: TrafficCounter  # production requests per region and version
    eval_traffic: TrafficCounter  # requests marked as eval traffic (evals.header)
    discovery: Discovery
    dataplane: DataPlane
    admission: AdmissionGate  # in front of the data plane's handler (limits.*)
    control: ControlPlane  # operators' fleet changes, shared by replicas
    rollout: RolloutController  # region cutover, soak, kill switch
    reloader: Reloader | None  # live config reload; None when there is nothing to re-read

    @property
    def live_settings(self) -> Settings:
        """The settings in force: the start's, or the last applied reload's. Read the
        reloadable ones (proxy/config/reload.py ``LIVE``) from here, not ``settings``."""
        return self.settings if self.reloader is None else self.reloader.current


def admission_gate(
    settings: Settings, metrics: ProxyMetrics, loop_lag: LoopLagMonitor, clock: Clock
) -> AdmissionGate:
    """The data port's admission control, its sheds counted by reason."""
    shed = {reason: metrics.shed.labels(reason) for reason in SHED_REASONS}
    return AdmissionGate(
        settings.limits.admission(),
        clock=clock.monotonic,
        # The worst lateness over the last few ticks, an overdue one included: one
        # tick's would forget a stall as soon as the loop caught up.
        loop_lag=loop_lag.worst_since, lag_window_s=LOOP_LAG_WINDOW_S,
        on_shed=lambda reason: shed[reason].inc(),
        retry_after_s=settings.routing.retry_after_s,
    )


def reconfigure_dataplane(dataplane: DataPlane, admission: AdmissionGate, new: Settings) -> None:
    """A reload's new policies for the data plane and its admission control."""
    dataplane.reconfigure(new)
    admission.reconfigure(new.limits.admission(), new.routing.retry_after_s)


def default_store(
    settings: Settings,
    clock: Clock,
    redis: Redis | None,
    on_conflict: ConflictHook,
    redis_metrics: RedisMetrics,
) -> PinStore:
    if redis is not None:
        return RedisPinStore(
            settings.store, redis, clock, owns_client=False, on_conflict=on_conflict,
            metrics=redis_metrics,
        )
    return MemoryPinStore(settings.store, clock)


def default_audit(
    settings: Settings, clock: Clock, redis: Redis | None, metrics: ProxyMetrics
) -> AuditLog:
    """The audit log beside the pin store: in Redis when pins are, else in memory."""
    if not settings.audit.enabled:
        return DisabledAudit(settings.audit)
    if redis is not None:

        def dropped(reason: str, count: int) -> None:
            metrics.audit_dropped.labels(reason).inc(count)

        return RedisAudit(
            settings.audit, settings.store, redis, on_drop=dropped, redis_metrics=metrics.redis
        )
    return MemoryAudit(settings.audit, settings.store.pin_ttl_s, clock)


def conflict_reporter(
    metrics: ProxyMetrics, audit: Callable[[], AuditLog | None], clock: Clock
) -> ConflictHook:
    """Counts, logs and audits a re-assertion conflict (the stored pin won).

    ``audit`` is read when a conflict happens: the audit log opens after the store.
    """

    def report(session_id: str, ours: Pin, stored: Pin) -> None:
        change = f"{ours.version_key} -> {stored.version_key}"
        metrics.pin_conflicts.labels(ours.version_key, stored.version_key).inc()
        metrics.version_switches.labels(
            "pin_conflict", ours.version_key, stored.version_key
        ).inc()
        logger.warning("re-asserted pin lost to the stored one: version %s", change)
        log = audit()
        if log is not None:
            log.offer(session_id, AuditRecord(
                at=clock.time(), request_id="-", trace_id="-", method="-", path="-",
                status=409, backend_id=stored.backend_id, region=stored.region,
                version_key=stored.version_key, latency_ms=0.0, version_changed=change,
                error_type="pin_conflict",
            ))  # fmt: skip

    return report


@asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    metrics_registry: CollectorRegistry | None = None,
    metrics_multiprocess_dir: str | None = None,
    store_factory: StoreFactory = default_store,
    observers: Sequence[RequestObserver] = (),
    reload_from: Callable[[], Settings] | None = None,
    notify_peers: Callable[[], None] | None = None,
    tracing: TracingObserver | None = None,
) -> AsyncIterator[Services]:
    """Open every service in the order of the module docstring; close them in reverse.

    ``metrics_multiprocess_dir``: prometheus-client's multiprocess directory when this
    is one of several workers (the supervisor sets it), so /metrics sums them all.
    ``reload_from`` re-reads and validates the config for a live reload (SIGHUP,
    ``POST /admin/reload``); without it the proxy cannot reload. ``notify_peers`` asks
    the other workers to reload too. ``tracing`` replaces the tracing the settings ask
    for (tests pass one with an in-memory exporter).
    """
    clock = clock or SystemClock()
    rng = rng or random.Random()
    configured = settings.backend_models()
    metrics = ProxyMetrics(
        metrics_registry or CollectorRegistry(),
        settings.metrics,
        multiprocess_dir=metrics_multiprocess_dir,
    )
    export_known_series(metrics, configured, metrics_listener=settings.metrics.port is not None)
    registry = Registry(
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
    fleet_metrics = FleetCollector(registry)
    metrics.add_scrape_time(fleet_metrics)
    telemetry = Telemetry(settings, metrics, tracing)
    loads = LoadTracker(
        clock, settings.routing.ewma_decay_s, settings.routing.initial_latency_ms / 1000.0
    )
    soak = SoakCounter(clock, check_interval_s=settings.rollout.check_interval_s)
    loop_lag = LoopLagMonitor(metrics.loop_lag.observe, clock=clock.monotonic)
    opened_audit: list[AuditLog] = []  # for the conflict reporter, once it exists

    async with AsyncExitStack() as stack:
        # 1. Telemetry closes last; in a thread, as exporting the last spans may wait
        # on the network.
        stack.push_async_callback(asyncio.to_thread, telemetry.close)
        # 2.
        loop_lag.start()
        stack.callback(loop_lag.stop)
        # 3. One trust policy for both clients (proxied requests, /version polls).
        tls = client_tls_context(settings.upstream)
        http1 = Http1Pool(settings.upstream, tls=tls)
        stack.push_async_callback(http1.close)
        http = await stack.enter_async_context(make_client_session(settings.upstream, tls))
        # 4.
        redis: Redis | None = None
        if settings.store.kind == "redis":
            redis = redis_client_from_config(settings.store)
            stack.push_async_callback(redis.aclose)
        # 5.
        store = store_factory(
            settings, clock, redis,
            conflict_reporter(metrics, lambda: opened_audit[0] if opened_audit else None,
                              clock),
            metrics.redis,
        )
        await store.start()
        stack.push_async_callback(store.close)
        # 6.
        audit = default_audit(settings, clock, redis, metrics)
        await audit.start()
        stack.push_async_callback(audit.close)
        opened_audit.append(audit)
        # 7.
        traffic, eval_traffic = (
            TrafficCounter(
                clock, redis=redis, key_prefix=settings.store.key_prefix, name=name,
                evals=evals, op_timeout_s=settings.store.op_timeout_ms / 1000,
                redis_metrics=metrics.redis,
            )
            for name, evals in (("traffic", False), ("traffic-evals", True))
        )
        for counter in (traffic, eval_traffic):
            await counter.start()
            stack.push_async_callback(counter.close)
        # 8.
        discovery = Discovery(registry, http, settings.discovery, rng)
        await discovery.start()
        stack.push_async_callback(discovery.stop)
        request_observers = (*telemetry.observers, *observers, traffic, eval_traffic, soak)
        if settings.audit.enabled:
            request_observers = (*request_observers, AuditObserver(audit))
        dataplane = DataPlane(
            settings=settings,
            registry=registry,
            store=store,
            loads=loads,
            upstream=Upstream(http1),
            metrics=metrics,
            clock=clock,
            rng=rng,
            loop_lag=loop_lag,
            probe=discovery.probe,
            observers=request_observers,
            trace=None if telemetry.tracing is None else telemetry.tracing.upstream_traceparent,
        )
        admission = admission_gate(settings, metrics, loop_lag, clock)
        # 9.
        control_store: ControlStore = (
            LocalControlStore()
            if redis is None
            else RedisControlStore(
                redis, settings.store.key_prefix, clock, settings.store.op_timeout_ms / 1000,
                sharded=partial(sharded_pubsub_opener, settings.store, redis)
                if settings.store.topology == "cluster" else None,
                redis_metrics=metrics.redis,
            )
        )
        control = ControlPlane(
            configured=configured,
            registry=registry,
            discovery=discovery,
            loads=loads,
            store=control_store,
            clock=clock,
        )
        await control.start()
        stack.push_async_callback(control.close)
        # 10.
        kept = settings.rollout.events_kept
        rollout_store: RolloutStore = (
            LocalRolloutStore(kept) if redis is None else RedisRolloutStore(
                redis, settings.store.key_prefix, clock, settings.store.op_timeout_ms / 1000,
                events_kept=kept, redis_metrics=metrics.redis,
            )
        )
        rollout = RolloutController(
            config=settings.rollout, registry=registry, store=rollout_store,
            counter=soak, block=lambda version: control.set_blocked(version, True),
            admit=lambda version: control.set_blocked(version, False),
            clock=clock, metrics_registry=metrics.registry, replica=replica_name(),
            stop_timeout_s=1.0 + 2 * settings.store.op_timeout_ms / 1000,
        )
        await rollout.start()
        stack.push_async_callback(rollout.close)
        # 11. Live reload steers the data plane and the control plane, both built by now.

        async def reconfigure_backends(backends: Sequence[Backend]) -> None:
            export_backend_series(metrics, backends)
            await control.reconfigure(backends)

        reloader = None if reload_from is None else Reloader(
            settings, reload_from,
            reconfigure_dataplane=lambda new: reconfigure_dataplane(dataplane, admission, new),
            reconfigure_backends=reconfigure_backends, notify_peers=notify_peers,
        )
        # Last: its exporters start once everything they observe exists.
        telemetry.start()
        yield Services(
            settings=settings, clock=clock, rng=rng, metrics=metrics,
            fleet_metrics=fleet_metrics, telemetry=telemetry, registry=registry,
            loads=loads, drain=Drain(), soak=soak, loop_lag=loop_lag, http=http,
            http1=http1, redis=redis, store=store, audit=audit, traffic=traffic,
            eval_traffic=eval_traffic, discovery=discovery, dataplane=dataplane,
            admission=admission,
            control=control, rollout=rollout, reloader=reloader,
        )


def replica_name() -> str:
    """This replica's name in the fleet's rollout decisions: host (a pod's name), process,
    and a random suffix, as replicas (and the tests' in-process ones) may share both."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
