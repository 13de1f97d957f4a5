"""The control plane: operators' changes to the fleet, shared by every proxy replica.

Theory of operation
-------------------
What an operator changes through the admin API (backends added or removed at run
time, drain flags, versions blocked for new sessions, pushed runtime reports, the
controller's intended versions) must hold on every replica, or the fleet would route
by different rules depending on which replica a request reached. ``ControlPlane``
keeps all of it as one immutable ``ControlState`` and makes its process's Registry
agree with that state (``_apply``). The registry stays the only writer of runtime
versions and health; pushed reports reach it as ordinary reports.

Every change is computed as new state = f(current state), persisted through the
``ControlStore``, then applied locally. ``LocalControlStore`` (memory pin store, one
process) only keeps it; ``RedisControlStore`` (proxy/fleet/control_redis.py) writes the
changed fields and publishes a notice in one transaction, and every replica reloads
and applies the whole state when it hears one. Applying is idempotent (it diffs the
desired state against the registry), so hearing one's own notice changes nothing.
Local changes and reloads are serialised by one lock, so a reload that read the store
before a local change was written cannot undo it.

A pushed runtime report is an observation, not a setting: each push has a unique id
and is applied once per process, so a later poll or response stamp still wins (the
registry's "last report wins"), and reloading for an unrelated change does not
re-apply an old push. For a push-mode backend (not polled) a push also counts as a
successful health check: the controller vouches that the runtime is up, and the data
plane's connection failures still take it down through the usual hysteresis.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, TypeVar

from proxy.core.errors import Conflict, NotFound, ProxyError
from proxy.core.tasks import stop_tasks

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from proxy.core.clock import Clock
    from proxy.core.ewma import LoadTracker
    from proxy.core.models import Backend, VersionBundle
    from proxy.fleet.discovery import Discovery
    from proxy.fleet.registry import Registry

logger = logging.getLogger(__name__)
# A cancelled first poll ends at once; the deadline only bounds one that swallowed its
# cancellation (proxy/core/tasks.py).
_STOP_POLLS_S = 5.0

K = TypeVar("K")
V = TypeVar("V")


class UnknownBackend(NotFound):
    def __init__(self, backend_id: str) -> None:
        super().__init__(f"no backend with id {backend_id!r}", code="unknown_backend",
                         param="backend_id")


class BackendExists(Conflict):
    def __init__(self, backend_id: str) -> None:
        super().__init__(f"a backend with id {backend_id!r} already exists",
                         code="backend_exists", param="id")


class ControlUnavailable(ProxyError):
    """The shared control state could not be read or written.

    This process's registry is not changed by the failed call. A write that timed out
    may still have reached Redis; its notice then applies it everywhere, here included.
    """

    status = 503
    error_type = "control_plane_unavailable"
    default_code = "control_plane_unavailable"


@dataclass(frozen=True, slots=True)
class PushedReport:
    """A runtime version pushed through the admin API for a backend."""

    version: VersionBundle
    at: float  # wall-clock seconds of the push
    push_id: str  # unique per push: each replica applies a push exactly once


@dataclass(frozen=True, slots=True)
class ControlState:
    """Everything operators changed at run time; the config file supplies the rest."""

    added: Mapping[str, Backend] = field(default_factory=dict)
    removed: frozenset[str] = frozenset()  # configured backends removed at run time
    drained: frozenset[str] = frozenset()
    blocked: frozenset[str] = frozenset()  # version keys or bare prompts
    intents: Mapping[str, VersionBundle] = field(default_factory=dict)
    pushes: Mapping[str, PushedReport] = field(default_factory=dict)

    def without_backend(self, backend_id: str) -> ControlState:
        """This state with every per-backend setting of ``backend_id`` dropped."""
        return replace(
            self,
            added=_without(self.added, backend_id),
            drained=self.drained - {backend_id},
            intents=_without(self.intents, backend_id),
            pushes=_without(self.pushes, backend_id),
        )


def _without(mapping: Mapping[K, V], key: K) -> dict[K, V]:
    return {k: v for k, v in mapping.items() if k != key}


class ControlStore(Protocol):
    """Where the control state lives and how changes made elsewhere are heard."""

    async def load(self) -> ControlState:
        """The whole current state; raises ``ControlUnavailable``."""
        ...

    async def save(self, before: ControlState, after: ControlState) -> None:
        """Persist the change from ``before`` to ``after`` and notify other replicas."""
        ...

    async def start(self, reload: Callable[[], Awaitable[None]]) -> None:
        """Begin calling ``reload`` whenever the state may have changed elsewhere."""
        ...

    async def close(self) -> None: ...


class LocalControlStore:
    """The state of a single process (memory pin store): nothing to share or hear."""

    def __init__(self) -> None:
        self._state = ControlState()

    async def load(self) -> ControlState:
        return self._state

    async def save(self, before: ControlState, after: ControlState) -> None:
        self._state = after

    async def start(self, reload: Callable[[], Awaitable[None]]) -> None:
        return None

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"LocalControlStore(state={self._state!r})"


class ControlPlane:
    """Applies operator changes to the registry, here and (via the store) on every replica."""

    def __init__(
        self,
        *,
        configured: Sequence[Backend],
        registry: Registry,
        discovery: Discovery,
        loads: LoadTracker,
        store: ControlStore,
        clock: Clock,
    ) -> None:
        self._configured = tuple(configured)
        self._configured_ids = frozenset(b.id for b in configured)
        self._registry = registry
        self._discovery = discovery
        self._loads = loads
        self._store = store
        self._clock = clock
        self._state = ControlState()
        self._lock = asyncio.Lock()
        self._applied_pushes: dict[str, str] = {}  # backend id -> push id applied here
        self._polls: set[asyncio.Task[None]] = set()
        self._applied = 0

    @property
    def state(self) -> ControlState:
        return self._state

    @property
    def applied(self) -> int:
        """How many times a state has been applied here (tests and repr)."""
        return self._applied

    def added_at_runtime(self, backend_id: str) -> bool:
        """Whether the backend was added through the admin API (not the config file)."""
        return backend_id in self._state.added

    async def start(self) -> None:
        """Load and apply the shared state, then follow changes made elsewhere."""
        await self._store.start(self.reload)

    async def close(self) -> None:
        """Stop following changes and cancel first polls still under way."""
        await self._store.close()
        await stop_tasks(list(self._polls), timeout_s=_STOP_POLLS_S, what="first polls")
        self._polls.clear()

    async def reload(self) -> None:
        """Read the whole state from the store and apply it (after a notice elsewhere)."""
        async with self._lock:
            self._apply(await self._store.load())

    async def reconfigure(self, configured: Sequence[Backend]) -> None:
        """Take a reloaded config's backend list and make the registry agree with it.

        Backends whose entry is unchanged keep their state (version, health, latency,
        load); new ones are added and polled at once, dropped ones removed, and one
        whose URL, region or version source changed starts afresh. Operator changes
        (added, removed, drained) still apply on top, as after a restart.
        """
        async with self._lock:
            self._configured = tuple(configured)
            self._configured_ids = frozenset(b.id for b in configured)
            self._apply(self._state)

    # -- changes (each raises UnknownBackend / BackendExists / ControlUnavailable) --------

    async def add_backend(self, backend: Backend) -> None:
        """Add a backend (its URL already checked); every replica starts polling it."""
        async with self._lock:
            if backend.id in self._registry.snapshot.by_id:
                raise BackendExists(backend.id)
            state = self._state.without_backend(backend.id)
            await self._commit(
                replace(
                    state,
                    added={**state.added, backend.id: backend},
                    removed=state.removed - {backend.id},
                )
            )

    async def remove_backend(self, backend_id: str) -> None:
        """Remove a configured or added backend, and every setting made for it."""
        async with self._lock:
            self._require(backend_id)
            state = self._state.without_backend(backend_id)
            if backend_id in self._configured_ids:
                state = replace(state, removed=state.removed | {backend_id})
            await self._commit(state)

    async def set_draining(self, backend_id: str, draining: bool) -> None:
        """Drain (no new sessions; pinned ones continue) or undrain a backend."""
        async with self._lock:
            self._require(backend_id)
            drained = self._state.drained
            drained = drained | {backend_id} if draining else drained - {backend_id}
            await self._commit(replace(self._state, drained=drained))

    async def push_version(self, backend_id: str, version: VersionBundle) -> None:
        """A runtime report for a backend that cannot serve /version (or any backend)."""
        async with self._lock:
            self._require(backend_id)
            push = PushedReport(version, self._clock.time(), uuid.uuid4().hex)
            await self._commit(
                replace(self._state, pushes={**self._state.pushes, backend_id: push})
            )

    async def set_intent(self, backend_id: str, version: VersionBundle | None) -> None:
        """The rollout controller's intended version; shown, never routed on."""
        async with self._lock:
            self._require(backend_id)
            intents = _without(self._state.intents, backend_id)
            if version is not None:
                intents[backend_id] = version
            await self._commit(replace(self._state, intents=intents))

    async def set_blocked(self, version: str, blocked: bool) -> None:
        """Block (or admit again) a version key or bare prompt for new sessions."""
        async with self._lock:
            current = self._state.blocked
            updated = current | {version} if blocked else current - {version}
            await self._commit(replace(self._state, blocked=updated))

    # -- internals -------------------------------------------------------------------

    def _require(self, backend_id: str) -> None:
        if backend_id not in self._registry.snapshot.by_id:
            raise UnknownBackend(backend_id)

    async def _commit(self, state: ControlState) -> None:
        if state == self._state:
            return
        await self._store.save(self._state, state)
        self._apply(state)

    def _apply(self, state: ControlState) -> None:
        """Make the registry agree with ``state``; idempotent, never awaits."""
        self._state = state
        self._applied += 1
        registry = self._registry
        desired = {b.id: b for b in self._configured if b.id not in state.removed}
        desired.update(state.added)
        membership_changed = False
        for backend_id, current in registry.snapshot.by_id.items():
            if desired.get(backend_id) != current.backend:
                # Gone, or re-added elsewhere with another URL/region: start it afresh.
                registry.remove_backend(backend_id)
                self._loads.forget(backend_id)
                self._applied_pushes.pop(backend_id, None)
                membership_changed = True
        fresh = []
        for backend_id, backend in desired.items():
            if backend_id not in registry.snapshot.by_id:
                registry.add_backend(backend)
                fresh.append(backend)
                membership_changed = True
        for current in registry.snapshot.backends:
            draining = current.id in state.drained
            if current.draining != draining:
                registry.set_draining(current.id, draining)
            registry.set_intent(current.id, state.intents.get(current.id))
        registry.set_blocked(state.blocked)
        for backend_id, push in state.pushes.items():
            current_state = registry.snapshot.by_id.get(backend_id)
            if current_state is None or self._applied_pushes.get(backend_id) == push.push_id:
                continue
            registry.report_version(backend_id, push.version, "push")
            if current_state.backend.version_source == "push":
                registry.report_success(backend_id)
            self._applied_pushes[backend_id] = push.push_id
        for backend_id in [b for b in self._applied_pushes if b not in state.pushes]:
            del self._applied_pushes[backend_id]
        if membership_changed:
            self._discovery.sync()
            for backend in fresh:
                if backend.version_source == "poll":
                    self._poll_now(backend)

    def _poll_now(self, backend: Backend) -> None:
        # Learn an added backend's version at once instead of one poll interval later.
        task = asyncio.create_task(self._discovery.poll(backend), name=f"first-poll:{backend.id}")
        self._polls.add(task)
        task.add_done_callback(self._polls.discard)

    def __repr__(self) -> str:
        s = self._state
        return (
            f"ControlPlane(store={type(self._store).__name__}, added={sorted(s.added)}, "
            f"removed={sorted(s.removed)}, drained={sorted(s.drained)}, "
            f"blocked={sorted(s.blocked)}, intents={len(s.intents)}, pushes={len(s.pushes)}, "
            f"applied={self._applied})"
        )
