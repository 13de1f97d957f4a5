"""Liveness and readiness on the data port, for orchestrators and load balancers.

``healthz`` answers 200 while the process can answer at all. ``readyz`` answers 200
only when this proxy can do its job: at least one backend is routable (healthy with a
runtime-reported version), the pin store answers a ping, and graceful shutdown has
not begun. Otherwise 503, with the failing checks named, so a balancer takes the
replica out of rotation before it would answer 503 to real traffic, and on SIGTERM
before the listener closes (``Drain``, ``listen.drain_grace_s``).

Both live under ``/_pinproxy/`` by default (``listen.health_path``/``ready_path``): a
prefix no proxied API uses, registered before the catch-all proxy route.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from proxy.core.errors import MethodNotAllowed, ProxyError

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.dataplane.exchange import Exchange
    from proxy.fleet.registry import Registry
    from proxy.store import PinStore


class Drain:
    """Whether graceful shutdown has begun; set once by the server, read by readiness."""

    def __init__(self) -> None:
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    def begin(self) -> None:
        self._draining = True

    def __repr__(self) -> str:
        return f"Drain(draining={self._draining})"


class HealthEndpoints:
    """The two handlers; ``store`` is looked up per call because it opens after build."""

    def __init__(
        self, *, registry: Registry, store: Callable[[], PinStore | None], drain: Drain
    ) -> None:
        self._registry = registry
        self._store = store
        self._drain = drain

    async def healthz(self, request: Exchange) -> None:
        _only_get(request)
        await _json(request, 200, {"status": "alive"})

    async def readyz(self, request: Exchange) -> None:
        _only_get(request)
        snapshot = self._registry.snapshot
        known = sum(1 for s in snapshot.backends if s.version_key is not None)
        routable = sum(1 for s in snapshot.backends if s.routable)
        backends: dict[str, Any] = {"ok": routable > 0, "routable": routable, "known": known,
                                    "configured": len(snapshot.backends)}
        pin_store: dict[str, Any] = {"ok": True}
        store = self._store()
        if store is None:
            pin_store = {"ok": False, "detail": "the pin store has not started"}
        else:
            try:
                await store.ping()  # bounded by the store's own operation timeout
            except ProxyError as exc:
                pin_store = {"ok": False, "detail": exc.message}
        draining = self._drain.draining
        ready = backends["ok"] and pin_store["ok"] and not draining
        status = "ready" if ready else ("draining" if draining else "not_ready")
        body = {
            "status": status,
            "checks": {"backends": backends, "pin_store": pin_store,
                       "draining": {"ok": not draining}},
        }
        await _json(request, 200 if ready else 503, body)

    def __repr__(self) -> str:
        return f"HealthEndpoints(drain={self._drain!r})"


def _only_get(request: Exchange) -> None:
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed(
            f"{request.method} is not allowed here (GET only)", headers={"Allow": "GET, HEAD"}
        )


async def _json(request: Exchange, status: int, body: dict[str, Any]) -> None:
    # Never cached: a balancer must see the current answer.
    await request.respond(status, _JSON_HEADERS, orjson.dumps(body))


_JSON_HEADERS = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))
