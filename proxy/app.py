"""Composition root: the one place that builds pinproxy's objects and wires them.

Resources open in ``cleanup_ctx`` order (HTTP client, Redis client, pin store,
discovery) and close in reverse, so discovery stops before the client it polls with
is closed and the store flushes its batched work before the Redis client goes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from proxy.clock import Clock, SystemClock
from proxy.config import Settings
from proxy.dataplane import DataPlane, error_response
from proxy.discovery import Discovery
from proxy.errors import BadRequest, ProxyError
from proxy.ewma import LoadTracker
from proxy.metrics import ProxyMetrics
from proxy.models import Backend
from proxy.registry import Registry
from proxy.store import PinStore
from proxy.store.memory import MemoryPinStore
from proxy.store.redis import RedisPinStore, redis_client_from_config
from proxy.upstream import Upstream, make_client_session

if TYPE_CHECKING:
    from proxy.events import RequestObserver

logger = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
CLOCK = web.AppKey("clock", Clock)
REGISTRY = web.AppKey("registry", Registry)
LOADS = web.AppKey("loads", LoadTracker)
METRICS = web.AppKey("metrics", ProxyMetrics)
HTTP = web.AppKey("http", aiohttp.ClientSession)
STORE = web.AppKey("store", PinStore)
DISCOVERY = web.AppKey("discovery", Discovery)
DATAPLANE = web.AppKey("dataplane", DataPlane)

REDIS = web.AppKey("redis", Redis)  # only when store.kind == "redis"

StoreFactory = Callable[[Settings, Clock, "Redis | None"], PinStore]


def default_store(settings: Settings, clock: Clock, redis: Redis | None) -> PinStore:
    if redis is not None:
        return RedisPinStore(settings.store, redis, clock, owns_client=False)
    return MemoryPinStore(settings.store, clock)


def build_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    metrics_registry: CollectorRegistry | None = None,
    store_factory: StoreFactory = default_store,
    observers: Sequence[RequestObserver] = (),
) -> web.Application:
    """Build the data-plane application; nothing opens until the app starts."""
    clock = clock or SystemClock()
    rng = rng or random.Random()
    app = web.Application(middlewares=[_last_resort], client_max_size=1024**2)
    app[SETTINGS] = settings
    app[CLOCK] = clock
    app[REGISTRY] = Registry(
        (Backend(id=b.id, region=b.region, url=b.url) for b in settings.backends),
        dimensions=settings.versions.dimensions,
        unhealthy_after=settings.discovery.unhealthy_after,
        healthy_after=settings.discovery.healthy_after,
        clock=clock,
    )
    app[LOADS] = LoadTracker(
        clock, settings.routing.ewma_decay_s, settings.routing.initial_latency_ms / 1000.0
    )
    app[METRICS] = ProxyMetrics(metrics_registry or CollectorRegistry())

    async def http_client(app: web.Application) -> AsyncIterator[None]:
        async with make_client_session(settings.upstream) as session:
            app[HTTP] = session
            yield

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
        store = store_factory(settings, clock, app.get(REDIS))
        await store.start()
        app[STORE] = store
        try:
            yield
        finally:
            await store.close()

    async def discovery(app: web.Application) -> AsyncIterator[None]:
        found = Discovery(app[REGISTRY], app[HTTP], settings.discovery, rng)
        app[DISCOVERY] = found
        await found.start()
        app[DATAPLANE] = DataPlane(
            settings=settings,
            registry=app[REGISTRY],
            store=app[STORE],
            loads=app[LOADS],
            upstream=Upstream(app[HTTP]),
            metrics=app[METRICS],
            clock=clock,
            rng=rng,
            observers=observers,
        )
        try:
            yield
        finally:
            await found.stop()

    app.cleanup_ctx.extend([http_client, redis_client, pin_store, discovery])

    async def proxy_handler(request: web.Request) -> web.StreamResponse:
        return await request.app[DATAPLANE].handle(request)

    app.router.add_route("*", "/{tail:.*}", proxy_handler)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _last_resort(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No traceback ever reaches a client: anything unexpected becomes a JSON 500."""
    try:
        return await handler(request)
    except ProxyError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        # aiohttp's own refusals (e.g. 405/413) in the OpenAI error shape.
        return error_response(_http_error(exc))
    except Exception:
        logger.exception("unexpected error handling %s %s", request.method, request.rel_url.path)
        return error_response(ProxyError("internal error in pinproxy"))


def _http_error(exc: web.HTTPException) -> ProxyError:
    if exc.status < 500:
        return BadRequest(exc.reason, code=str(exc.status), status=exc.status)
    return ProxyError(exc.reason, code=str(exc.status), status=exc.status)
