"""Live config reload: re-read the config file, validate it, apply what may change.

Triggered by SIGHUP (proxy/runtime/server.py) or ``POST /admin/reload``. A reload:

1. reads and validates the file exactly as at start (environment overrides and the
   command line's ``--host``/``--port``/``--workers`` included); an unreadable or
   invalid file is refused with the reason, naming each bad field;
2. asks the pure ``plan_reload`` what changed; a change to a setting that cannot
   change live (listen address, store, workers, metrics, ...) is refused, naming them;
3. otherwise swaps the data plane's policies (one assignment: requests in flight keep
   theirs) and hands the backend list to the control plane, which reconciles the
   registry (unchanged backends keep their health, latency and load). Pins live in the
   store and are not touched.

A refused reload changes nothing: the running config keeps serving. Reloads run one
at a time. With several workers each worker reloads itself; the worker that took an
admin call also asks the supervisor to signal the others (``notify_peers``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from proxy.config.reload import ReloadPlan, plan_reload
from proxy.core.errors import ConfigError, ProxyError
from proxy.telemetry.logs import set_log_level

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from proxy.config.settings import Settings
    from proxy.core.models import Backend

logger = logging.getLogger(__name__)

class ReloadRefused(ProxyError):
    """A reload that changed nothing: the new config is invalid (``ReloadInvalid``) or
    needs a restart (``ReloadNeedsRestart``)."""

    status = 422
    error_type = "invalid_request_error"
    default_code = "invalid_config"

    def __init__(self, message: str, *, fields: Sequence[str]) -> None:
        super().__init__(message, param=", ".join(fields) or None,
                         extra={"fields": list(fields)})


class ReloadInvalid(ReloadRefused):
    """The new config does not validate: 422 ``invalid_config``."""


class ReloadNeedsRestart(ReloadRefused):
    """The new config changes settings that cannot change live: 409 ``restart_required``."""

    status = 409
    default_code = "restart_required"


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """A reload that went through: what it applied (nothing, when the file is the same)."""

    status: Literal["applied", "unchanged"]
    plan: ReloadPlan


class Reloader:
    """Re-reads the config and applies it to the running proxy (see the module docstring)."""

    def __init__(
        self,
        current: Settings,
        load: Callable[[], Settings],
        *,
        reconfigure_dataplane: Callable[[Settings], None],
        reconfigure_backends: Callable[[Sequence[Backend]], Awaitable[None]],
        notify_peers: Callable[[], None] | None = None,
    ) -> None:
        """``load`` reads and validates the file (raises ``ConfigError``); it runs in a
        thread. ``notify_peers`` asks the other workers to reload (None: no others)."""
        self._current = current
        self._load = load
        self._dataplane = reconfigure_dataplane
        self._backends = reconfigure_backends
        self._notify_peers = notify_peers
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Settings:
        """The settings in force (the start's, or the last applied reload's)."""
        return self._current

    async def reload(self, *, tell_peers: bool = False) -> ReloadResult:
        """Reload once; raises ``ReloadRefused`` (nothing changed) with the reason.

        ``tell_peers``: also ask the other workers to reload (an admin call reaches one
        worker only; a signal reaches each worker from the supervisor).
        """
        async with self._lock:
            try:
                result = await self._reload()
            except ReloadRefused as exc:
                logger.warning("config reload refused: %s", exc.message)
                raise
            plan = result.plan
            if result.status == "applied":
                logger.info("config reloaded: changed %s", ", ".join(plan.changed))
            else:
                logger.info("config reloaded: nothing changed")
        if tell_peers and self._notify_peers is not None:
            self._notify_peers()
        return result

    async def reload_logged(self) -> None:
        """``reload`` for a signal: the outcome is one log line, never an exception."""
        try:
            await self.reload()
        except ReloadRefused:
            pass  # logged by reload()
        except Exception:
            logger.exception("config reload failed unexpectedly; the running config stays")

    async def _reload(self) -> ReloadResult:
        try:
            new = await asyncio.to_thread(self._load)
        except ConfigError as exc:
            text = str(exc)
            raise ReloadInvalid(
                f"the new config is invalid; the running one stays: {text}", fields=exc.fields,
            ) from exc
        plan = plan_reload(self._current, new)
        if not plan.allowed:
            raise ReloadNeedsRestart(
                "these settings cannot change while pinproxy runs (restart to apply them); "
                f"the running config stays: {', '.join(plan.fixed)}",
                fields=plan.fixed,
            )
        if plan.unchanged:
            return ReloadResult("unchanged", plan)
        # The data plane first: a backend added below is then already routed under the
        # new policies (e.g. a newly admitted version) from its first request.
        self._dataplane(new)
        await self._backends(new.backend_models())
        if "log.level" in plan.changed:
            # Before the outcome is logged: that line obeys the new level too.
            set_log_level(new.log)
        self._current = new
        return ReloadResult("applied", plan)

    def __repr__(self) -> str:
        return f"Reloader(backends={len(self._current.backends)})"
