"""The pin store's side of its invalidation subscription (proxy/redis/pubsub.py).

Another replica's repin or unpin arrives as the session id on ``<prefix>invalidate``
(redis_changes.py): the local copy is evicted. A (re)subscription is trusted only
after the repin log has been replayed past this replica's last position, since what
was published while it was not subscribed is only in the log (redis_sync.py); a quiet
moment with messages seen advances that position, so a later reconnection replays
little. While the subscription is down the cached copies stay in use (the store's
``subscribed`` event is clear, and it then serves them without asking first).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from proxy.core.errors import StoreUnavailable
from proxy.store.redis_wire import scrub

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from proxy.store.cache import PinCache
    from proxy.store.redis_sync import PinSync

_log = logging.getLogger("proxy.store.redis")  # one logger for the store's operators


class Invalidations:
    """The subscriber's callbacks for one pin store."""

    __slots__ = ("_cache", "_forget", "_secrets", "_subscribed", "_sync")

    def __init__(self, cache: PinCache, sync: PinSync, subscribed: asyncio.Event,
                 forget: Callable[[str], None], secrets: tuple[str, ...]) -> None:
        self._cache = cache
        self._sync = sync
        self._subscribed = subscribed
        self._forget = forget  # evicts one session's copy and its pending touch
        self._secrets = secrets

    async def on_subscribed(self) -> None:
        # Changes published while we were not subscribed are in the repin log: apply
        # them before trusting the subscription (a failure retries on the next poll).
        self._sync.stale = True
        try:
            await self._sync.catch_up(check_server=True)
        except StoreUnavailable as exc:
            _log.warning("repin log replay failed, will retry: %s", exc.message)
        self._subscribed.set()

    async def on_messages(self, batch: list[object]) -> None:
        for data in batch:
            self._invalidate(data)
        # Advance this replica's log position, so a later reconnection replays little.
        self._sync.stale = True

    async def on_quiet(self, now: float) -> None:
        if not self._sync.stale:
            return
        try:
            await self._sync.catch_up()
        except StoreUnavailable as exc:
            _log.warning("repin log replay failed, will retry: %s", exc.message)

    def on_lost(self, reason: str) -> None:
        if self._subscribed.is_set():
            # One line per outage: the cached pins stay in use, nothing else to report.
            _log.warning(
                "pin invalidation subscription lost; serving cached pins until it is back "
                "and the repin log is replayed: %s",
                scrub(reason, self._secrets),
            )
        self._subscribed.clear()

    def _invalidate(self, data: object) -> None:
        try:
            if isinstance(data, bytes):
                data = data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            data = None
        if isinstance(data, str):
            self._forget(data)
        else:
            # Not a session id we could have published: evict everything to be safe.
            self._cache.clear()
