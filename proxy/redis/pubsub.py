"""One Redis pub/sub subscription kept alive for as long as its owner runs.

The pin store (cache invalidation) and the control plane (operator changes) both
depend on hearing every notice, and both must know the moment they might not
have: a subscription that silently died would leave a stale cache or a replica
that never sees a drain. So the loop resubscribes with jittered backoff, pings a
quiet connection and treats an unanswered ping as a dead one, and tells its owner
when it (re)subscribed (everything published meanwhile is lost: reload) and when
it lost the subscription. On a cluster (``open_pubsub`` given) the subscription is
sharded: SSUBSCRIBE on a connection to the shard that serves the channel's slot,
reopened through the refreshed slot map whenever it breaks or the slot moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.core.tasks import stop_tasks
from proxy.redis.client import REDIS_FAILURES

if TYPE_CHECKING:
    import random
    from collections.abc import Awaitable, Callable

    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

    from proxy.core.clock import Clock

_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 1.0
_IDLE_PING_S = 5.0


class Subscriber:
    """Keeps ``channel`` subscribed; calls back on subscribe, on messages and on loss.

    ``on_messages`` gets every message's data that was already waiting, in one batch,
    so an owner that reloads on a notice reloads once for a burst. ``on_quiet`` runs
    on each poll that found nothing (for periodic work such as a backstop reload).
    """

    def __init__(
        self,
        client: Redis,
        channel: bytes | str,
        *,
        clock: Clock,
        rng: random.Random,
        op_timeout_s: float,
        poll_s: float,
        on_subscribed: Callable[[], Awaitable[None]],
        on_messages: Callable[[list[object]], Awaitable[None]],
        on_lost: Callable[[str], None],
        on_quiet: Callable[[float], Awaitable[None]] | None = None,
        open_pubsub: Callable[[], Awaitable[PubSub]] | None = None,
    ) -> None:
        self._client = client
        self._channel = channel
        self._clock = clock
        self._rng = rng
        self._op_timeout_s = op_timeout_s
        self._poll_s = poll_s
        self._on_subscribed = on_subscribed
        self._on_messages = on_messages
        self._on_lost = on_lost
        self._on_quiet = on_quiet
        # Sharded pub/sub (a cluster): a connection to the channel's shard, SSUBSCRIBE.
        self._open_pubsub = open_pubsub
        self._kinds = (
            ("ssubscribe", "smessage", "sunsubscribe") if open_pubsub is not None
            else ("subscribe", "message", "unsubscribe")
        )
        self._closed = False
        self.subscriptions = 0  # how many times the subscription was (re)confirmed

    def close(self) -> None:
        """Stop after the current poll (the owner also cancels the task running ``run``)."""
        self._closed = True

    async def run(self) -> None:
        backoff = _BACKOFF_MIN_S
        while not self._closed:
            pubsub: PubSub | None = None
            heard = self.subscriptions
            try:
                async with asyncio.timeout(self._op_timeout_s):
                    if self._open_pubsub is None:
                        pubsub = self._client.pubsub()
                        await pubsub.subscribe(self._channel)
                    else:
                        pubsub = await self._open_pubsub()
                        await pubsub.ssubscribe(self._channel)
                await self._listen(pubsub)
            except REDIS_FAILURES as exc:
                self._on_lost(f"{type(exc).__name__}: {exc}")
            except Exception:
                # Keep the subscriber alive whatever happens: without it notices are missed.
                logging.getLogger(__name__).exception("subscriber of %r failed", self._channel)
                self._on_lost("unexpected error")
            finally:
                if pubsub is not None:
                    with contextlib.suppress(*REDIS_FAILURES):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
            if self.subscriptions != heard:
                backoff = _BACKOFF_MIN_S
            await asyncio.sleep(backoff * self._rng.uniform(0.5, 1.0))
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _listen(self, pubsub: PubSub) -> None:
        pong_deadline = max(1.0, self._op_timeout_s)
        last_heard = self._clock.monotonic()
        ping_sent: float | None = None
        while not self._closed:
            message = await pubsub.get_message(timeout=self._poll_s)
            now = self._clock.monotonic()
            if message is None:
                if ping_sent is not None and now - ping_sent > pong_deadline:
                    raise RedisConnectionError("subscription stopped answering")
                if ping_sent is None and now - last_heard >= _IDLE_PING_S:
                    await pubsub.ping()
                    ping_sent = now
                if self._on_quiet is not None:
                    await self._on_quiet(now)
                continue
            last_heard, ping_sent = now, None
            kind = message.get("type")
            subscribed, data, unsubscribed = self._kinds
            if kind == subscribed:
                self.subscriptions += 1
                await self._on_subscribed()
            elif kind == data:
                batch = [message.get("data")]
                while (extra := await pubsub.get_message(timeout=0)) is not None:
                    if extra.get("type") == data:
                        batch.append(extra.get("data"))
                await self._on_messages(batch)
            elif kind == unsubscribed:
                # A cluster moved the channel's slot to another shard: follow it.
                raise RedisConnectionError("unsubscribed by the server (slot moved?)")

    def __repr__(self) -> str:
        return f"Subscriber(channel={self._channel!r}, subscriptions={self.subscriptions})"


async def stop(
    subscriber: Subscriber | None, task: asyncio.Task[None] | None, *, timeout_s: float,
    what: str,
) -> None:
    """Close ``subscriber`` and cancel the task running it, waiting until it has ended,
    for at most ``timeout_s`` (proxy/core/tasks.py: a cancellation can be swallowed)."""
    if subscriber is not None:
        subscriber.close()
    await stop_tasks([task], timeout_s=timeout_s, what=what)
