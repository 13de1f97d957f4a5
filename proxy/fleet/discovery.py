"""Background polling of every backend's ``/version``: the runtime's own report.

One task per backend. Intervals carry jitter so a fleet of proxies does not poll in
lockstep. A poll that answers 200 with a valid version document is a success and a
version report; anything else (timeout, refused, non-200, bad JSON) is a failure
for the registry's health hysteresis. Polls never raise into the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
import orjson

from proxy.core.models import Backend, InvalidVersion, VersionBundle
from proxy.core.tasks import stop_tasks

if TYPE_CHECKING:
    import random

    from proxy.config.settings import DiscoveryConfig
    from proxy.fleet.registry import Registry

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


class Discovery:
    def __init__(
        self,
        registry: Registry,
        http: aiohttp.ClientSession,
        config: DiscoveryConfig,
        rng: random.Random,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._registry = registry
        self._http = http
        self._config = config
        self._rng = rng
        self._sleep = sleep
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)

    async def start(self) -> None:
        """Poll every backend once (so the first requests find versions), then keep polling."""
        await self.poll_all()
        self.sync()

    def sync(self) -> None:
        """Start polling backends the registry gained and stop those it lost."""
        # Push-mode backends cannot serve /version: polling them would only fail and
        # mark them unhealthy. Their versions arrive through the admin API instead.
        current = {
            s.id: s.backend
            for s in self._registry.snapshot.backends
            if s.backend.version_source == "poll"
        }
        for backend_id in list(self._tasks):
            if backend_id not in current:
                self._tasks.pop(backend_id).cancel()
        for backend_id, backend in current.items():
            if backend_id not in self._tasks:
                self._tasks[backend_id] = asyncio.create_task(
                    self._loop(backend), name=f"discovery:{backend_id}"
                )

    def probe(self, backend_id: str) -> None:
        """Poll one backend now, out of turn (a failed connection, a refusal).

        At most one such poll per backend is in flight; push-mode and unknown
        backends are not polled.
        """
        if backend_id in self._probes:
            return
        state = self._registry.snapshot.by_id.get(backend_id)
        if state is None or state.backend.version_source != "poll":
            return
        task = asyncio.create_task(
            self.poll(state.backend, out_of_turn=True), name=f"probe:{backend_id}"
        )
        self._probes[backend_id] = task
        task.add_done_callback(lambda _: self._probes.pop(backend_id, None))

    async def stop(self) -> None:
        tasks = [*self._tasks.values(), *self._probes.values()]
        self._tasks.clear()
        self._probes.clear()
        # A cancelled poll ends at once; the deadline bounds one that swallowed it.
        await stop_tasks(tasks, timeout_s=1.0 + 2 * self._config.timeout_s, what="discovery")

    async def poll_all(self) -> None:
        backends = [
            s.backend
            for s in self._registry.snapshot.backends
            if s.backend.version_source == "poll"
        ]
        await asyncio.gather(*(self.poll(b) for b in backends))

    async def poll(self, backend: Backend, *, out_of_turn: bool = False) -> None:
        """One poll of one backend, applied to the registry.

        ``out_of_turn``: a probe asked for by a failed or dropped request. Its
        connection refused is a verdict (the POP is gone), so the backend is marked
        suspect at once; a scheduled poll's failure only counts towards
        ``unhealthy_after``, so one lost poll does not flap a backend.
        """
        url = backend.url + self._config.path
        started = self._registry.check_started()
        try:
            async with self._http.get(url, timeout=self._timeout, allow_redirects=False) as resp:
                if resp.status != 200:
                    self._registry.report_failure(
                        backend.id, f"{self._config.path} -> {resp.status}"
                    )
                    return
                body = await resp.read()
            bundle = parse_version_report(body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            why = f"poll failed: {type(exc).__name__}"
            if out_of_turn and isinstance(exc, aiohttp.ClientConnectorError):
                self._registry.mark_suspect(backend.id, f"probe refused: {type(exc).__name__}")
            self._registry.report_failure(backend.id, why)
            return
        except InvalidVersion as exc:
            logger.warning("backend %s sent an unusable version report: %s", backend.id, exc)
            self._registry.report_failure(backend.id, "invalid version report")
            return
        self._registry.report_version(backend.id, bundle, "poll")
        self._registry.report_success(backend.id, started)

    async def _loop(self, backend: Backend) -> None:
        interval = self._config.interval_s
        spread = self._config.jitter
        while True:
            await self._sleep(interval * (1.0 + spread * self._rng.uniform(-1.0, 1.0)))
            await self.poll(backend)

    def __repr__(self) -> str:
        return f"Discovery(backends={len(self._tasks)}, interval_s={self._config.interval_s})"


def parse_version_report(body: bytes) -> VersionBundle:
    """A ``/version`` document's bundle; ``InvalidVersion`` for anything unusable."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidVersion(f"version document is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidVersion("version document is not a JSON object")
    return VersionBundle.from_mapping(data)
