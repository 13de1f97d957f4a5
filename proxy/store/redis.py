"""The shared pin store: Redis, fronted by a process-local cache.

Theory of operation
-------------------
Why the local cache is safe: a pin is written once (``SET NX``, atomic across every
replica) and afterwards changes only through ``repin``/``unpin``. Those write and
PUBLISH the session id on ``<prefix>invalidate`` inside one MULTI/EXEC, so whenever the
change is applied the broadcast goes out too; every process subscribes to that channel
and evicts the session. A copy can therefore only be stale while an invalidation is in
flight (milliseconds), or while the subscription is down. The cache is used only while
the subscription is confirmed, and it is cleared whenever the subscription breaks and
again when it is (re)confirmed, since messages sent in between are lost. Reads that
raced an invalidation are fenced by the cache generation (see ``PinCache.put``), and
every entry is re-read after ``local_cache_ttl_s`` regardless.

Why touches are batched: invariant "a cached pin costs no network round trip". A cache
hit still has to slide the pin's TTL in Redis, so it only records the session in a
pending set; a background task sends the refreshes every ``touch_interval_s`` as
pipelined PEXPIREs. A PEXPIRE that finds no key means the pin expired or was deleted
behind our back, so the local copy goes too. Misses use GETEX, which reads and slides
in one round trip.

Why pinned sessions are counted in sorted sets: operators ask "how many sessions are
pinned to v47" (rollback, the fleet view) and the answer must not scan every pin.
Each version key has a sorted set ``<prefix>pinned:<version key>`` of session id ->
wall-clock time of last use. The batched touches above already carry every use, so
the same pipeline ZADDs the session (and trims entries older than the pin TTL); a
count is a ZCOUNT over the TTL window. It lags by up to ``touch_interval_s`` for
sessions used on other replicas, and a repin or unpin moves or removes the entry.

TTLs go in milliseconds (PX / PEXPIRE) so fractional ``pin_ttl_s`` works. Keys are bytes
(see redis_wire.py: no session id can collide with another or break its key). Each
call is bounded by ``op_timeout_ms`` whatever the injected client's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING, Any, TypeVar

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.errors import StoreUnavailable
from proxy.pubsub import Subscriber
from proxy.store.cache import PinCache
from proxy.store.redis_wire import decode_pin, encode_pin, member, scrub, secrets_of

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterable, Sequence

    from redis.asyncio import Redis

    from proxy.clock import Clock
    from proxy.config import StoreConfig
    from proxy.models import Pin

T = TypeVar("T")

_log = logging.getLogger(__name__)

_TOUCH_CHUNK = 500
_POLL_S = 0.5


class RedisPinStore:
    """``PinStore`` on Redis with a local cache, batched TTL touches and pub/sub invalidation."""

    def __init__(
        self, config: StoreConfig, client: Redis, clock: Clock, *, owns_client: bool = True
    ) -> None:
        self._config = config
        self._client = client
        self._owns_client = owns_client  # False: the composition root shares and closes it
        self._clock = clock
        self._prefix = config.key_prefix
        self._key_prefix = f"{config.key_prefix}pin:".encode()
        self._pinned_prefix = f"{config.key_prefix}pinned:".encode()
        self._channel = f"{config.key_prefix}invalidate".encode()
        self._ttl_ms = max(1, round(config.pin_ttl_s * 1000))
        self._op_timeout_s = config.op_timeout_ms / 1000
        self._cache = PinCache(config.local_cache_size, config.local_cache_ttl_s, clock)
        # Sessions used since the last batch -> their pinned version key.
        self._touches: dict[str, str] = {}
        self._subscribed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._answered_at = float("-inf")  # when a call last succeeded (monotonic)
        self._secrets = secrets_of(config)
        self._subscriber = Subscriber(
            client,
            self._channel,
            clock=clock,
            rng=random.Random(),
            op_timeout_s=self._op_timeout_s,
            poll_s=_POLL_S,
            on_subscribed=self._on_subscribed,
            on_messages=self._on_invalidations,
            on_lost=self._on_subscription_lost,
        )

    @property
    def subscribed(self) -> bool:
        """True while the invalidation subscription is confirmed (the cache is in use)."""
        return self._subscribed.is_set()

    @property
    def subscriptions(self) -> int:
        """How many times the invalidation channel has been (re)subscribed."""
        return self._subscriber.subscriptions

    @property
    def cached(self) -> int:
        return len(self._cache)

    @property
    def pending_touches(self) -> int:
        return len(self._touches)

    def key(self, session_id: str) -> bytes:
        """The Redis key holding the session's pin."""
        return self._key_prefix + session_id.encode("utf-8", "surrogatepass")

    def pinned_key(self, version_key: str) -> bytes:
        """The sorted set of sessions pinned to ``version_key`` (see count_pinned)."""
        return self._pinned_prefix + version_key.encode()

    async def get(self, session_id: str) -> Pin | None:
        self._check_open()
        if self._subscribed.is_set():
            pin = self._cache.get(session_id)
            if pin is not None:
                self._touches[session_id] = pin.version_key
                return pin
        generation = self._cache.generation
        raw = await self._call("get", self._client.getex(self.key(session_id), px=self._ttl_ms))
        if raw is None:
            return None
        pin = self._decode(session_id, raw)
        self._remember(session_id, pin, generation)
        return pin

    async def pin_if_absent(self, session_id: str, pin: Pin) -> Pin:
        self._check_open()
        generation = self._cache.generation
        key = self.key(session_id)
        raw = await self._call(
            "pin", self._client.set(key, encode_pin(pin), px=self._ttl_ms, nx=True, get=True)
        )
        winner = pin if raw is None else self._decode(session_id, raw)
        # A pin that was read rather than written gets its TTL slid like any hit; either
        # way the next batch records the session under its version (count_pinned).
        self._touches[session_id] = winner.version_key
        self._remember(session_id, winner, generation)
        return winner

    async def repin(self, session_id: str, pin: Pin) -> Pin | None:
        self._check_open()
        key = self.key(session_id)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(key, encode_pin(pin), px=self._ttl_ms, get=True)
                pipe.zadd(
                    self.pinned_key(pin.version_key), {member(session_id): self._clock.time()}
                )
                pipe.publish(self._channel, session_id.encode("utf-8", "surrogatepass"))
                results = await self._call("repin", pipe.execute())
        finally:
            # Even a failed write may have been applied (a timeout after sending).
            self._cache.evict(session_id)
            self._touches.pop(session_id, None)
        previous = self._previous(session_id, results[0])
        if previous is not None and previous.version_key != pin.version_key:
            await self._uncount(session_id, previous)
        return previous

    async def unpin(self, session_id: str) -> Pin | None:
        self._check_open()
        key = self.key(session_id)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.getdel(key)
                pipe.publish(self._channel, session_id.encode("utf-8", "surrogatepass"))
                results = await self._call("unpin", pipe.execute())
        finally:
            self._cache.evict(session_id)
            self._touches.pop(session_id, None)
        previous = self._previous(session_id, results[0])
        if previous is not None:
            await self._uncount(session_id, previous)
        return previous

    async def count_pinned(self, version_key: str) -> int:
        self._check_open()
        # This replica's pending uses first, so its own sessions are counted exactly.
        await self.flush_touches()
        since = self._clock.time() - self._config.pin_ttl_s
        count = await self._call(
            "count", self._client.zcount(self.pinned_key(version_key), since, "+inf")
        )
        return int(count)

    async def _uncount(self, session_id: str, pin: Pin) -> None:
        # A repin/unpin is rare (admin, retirement): one more round trip is fine, and a
        # failure only leaves a count high until the entry ages out of the TTL window.
        try:
            await self._call(
                "uncount", self._client.zrem(self.pinned_key(pin.version_key), member(session_id))
            )
        except StoreUnavailable as exc:
            _log.warning("pinned-session count not updated: %s", exc.message)

    async def ping(self) -> None:
        self._check_open()
        await self._call("ping", self._client.ping())

    async def start(self) -> None:
        self._check_open()
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(
                self._subscriber.run(), name=f"pinstore-invalidate:{self._prefix}"
            ),
            asyncio.create_task(self._touch_forever(), name=f"pinstore-touch:{self._prefix}"),
        ]
        # Starting without the subscription is allowed (Redis may come up later): the
        # store then works uncached until the background task gets through.
        try:
            async with asyncio.timeout(self._op_timeout_s):
                await self._subscribed.wait()
        except TimeoutError:
            _log.warning("pin store started before its invalidation subscription was confirmed")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._subscriber.close()
        try:
            await self.flush_touches()
        except StoreUnavailable as exc:
            _log.warning("pending TTL touches dropped on close: %s", exc.message)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # The loops also stop on ``_closed``, should a cancellation get swallowed.
            _, stuck = await asyncio.wait(self._tasks, timeout=1.0 + 2 * self._op_timeout_s)
            if stuck:
                _log.warning("pin store background tasks did not stop: %s", stuck)
        self._tasks = []
        if self._owns_client:
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()

    async def flush_touches(self) -> None:
        """Send the pending TTL refreshes now; evict local copies whose key is gone."""
        if not self._touches:
            return
        touched = list(self._touches.items())
        self._touches = {}
        for start in range(0, len(touched), _TOUCH_CHUNK):
            chunk = touched[start : start + _TOUCH_CHUNK]
            alive = await self._call("touch", self._pexpire_all(chunk))
            gone = [
                (sid, version)
                for (sid, version), exists in zip(chunk, alive, strict=True)
                if not exists
            ]
            for session_id, _version in gone:
                self._cache.evict(session_id)
            if gone:
                # The pin expired or was deleted behind our back: not pinned any more.
                await self._call("touch", self._zrem_all(gone))

    async def _pexpire_all(self, touched: Sequence[tuple[str, str]]) -> list[Any]:
        now = self._clock.time()
        by_version: dict[str, dict[bytes, float]] = {}
        async with self._client.pipeline(transaction=False) as pipe:
            for session_id, version_key in touched:
                pipe.pexpire(self.key(session_id), self._ttl_ms)
                by_version.setdefault(version_key, {})[member(session_id)] = now
            for version_key, members in by_version.items():
                pinned = self.pinned_key(version_key)
                pipe.zadd(pinned, members)
                # Entries unused for a whole TTL belong to pins that have expired.
                pipe.zremrangebyscore(pinned, "-inf", now - self._config.pin_ttl_s)
                pipe.pexpire(pinned, self._ttl_ms)
            results = await pipe.execute()
        return results[: len(touched)]

    async def _zrem_all(self, gone: Iterable[tuple[str, str]]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for session_id, version_key in gone:
                pipe.zrem(self.pinned_key(version_key), member(session_id))
            return await pipe.execute()

    async def _touch_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._config.touch_interval_s)
            try:
                await self.flush_touches()
            except StoreUnavailable as exc:
                # Losing one batch only shortens TTLs that are normally hours long; the
                # next hit of each session schedules its touch again.
                _log.warning("TTL touch batch dropped: %s", exc.message)
            except Exception:
                _log.exception("TTL touch batch failed unexpectedly")

    async def _on_subscribed(self) -> None:
        # Anything published while we were not subscribed is lost.
        self._cache.clear()
        self._subscribed.set()

    async def _on_invalidations(self, batch: list[object]) -> None:
        for data in batch:
            self._invalidate(data)

    def _on_subscription_lost(self, reason: str) -> None:
        self._subscribed.clear()
        self._cache.clear()
        _log.warning(
            "pin invalidation subscription lost, local cache dropped: %s",
            scrub(reason, self._secrets),
        )

    def _invalidate(self, data: object) -> None:
        try:
            if isinstance(data, bytes):
                data = data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            data = None
        if isinstance(data, str):
            self._cache.evict(data)
            # A pending use would re-add the session under the version it just left.
            self._touches.pop(data, None)
        else:
            # Not a session id we could have published: evict everything to be safe.
            self._cache.clear()

    def _remember(self, session_id: str, pin: Pin, generation: int) -> None:
        if self._subscribed.is_set():
            self._cache.put(session_id, pin, generation)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the pin store is closed")

    async def _call(self, what: str, operation: Awaitable[T]) -> T:
        started = self._clock.monotonic()
        try:
            async with asyncio.timeout(self._op_timeout_s):
                result = await operation
        except (RedisError, OSError) as exc:  # OSError covers TimeoutError from asyncio
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # redis-py can turn a cancellation that lands in its own timeout or
                # reconnect handling into an error; the caller asked to stop, so stop.
                raise asyncio.CancelledError from exc
            detail = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
            error = StoreUnavailable(
                f"pin store {what} failed at {self._config.masked_url()}: {detail}",
                code="pin_store_unavailable",
            )
            error.timed_out = isinstance(exc, TimeoutError | RedisTimeoutError)
            # Other calls answered while this one waited (for a pooled connection, or
            # for the event loop): Redis works, this process is what is slow.
            error.store_answering = self._answered_at > started
            raise error from exc
        self._answered_at = self._clock.monotonic()
        return result

    def _decode(self, session_id: str, raw: object) -> Pin:
        try:
            return decode_pin(raw)
        except ValueError as exc:
            # Refuse rather than guess: a garbled pin is not the same as no pin.
            raise StoreUnavailable(
                f"the stored pin for session {session_id[:64]!r} is unreadable"
            ) from exc

    def _previous(self, session_id: str, raw: object) -> Pin | None:
        if raw is None:
            return None
        try:
            return self._decode(session_id, raw)
        except StoreUnavailable as exc:
            # The write already succeeded; a garbled old value must not turn it into a 503.
            _log.warning("%s (replaced)", exc.message)
            return None

    def __repr__(self) -> str:
        return (
            f"RedisPinStore(prefix={self._prefix!r}, url={self._config.masked_url()!r}, "
            f"cached={len(self._cache)}, pending_touches={len(self._touches)}, "
            f"subscribed={self._subscribed.is_set()}, closed={self._closed})"
        )
