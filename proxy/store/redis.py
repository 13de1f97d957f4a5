"""The shared pin store: Redis, fronted by a process-local cache.

Theory of operation
-------------------
Why the local cache is safe: a pin is written once (pin-if-absent, atomic across every
replica) and afterwards changes only through ``repin``/``unpin`` (redis_changes.py).
Those write the pin, append the session to the repin log and PUBLISH it on
``<prefix>invalidate`` inside one MULTI/EXEC, so whenever the change is applied the
broadcast goes out and the log holds it; every process subscribes to that channel and
evicts the session. While the subscription is down (a Redis restart, a network cut)
the cached copies stay in use: they are still the pins, unless a repin happened
meanwhile, and a replica that reconnects replays the log past its last position
before anything else (see redis_sync.py), so no change made while it was cut off
survives its return. Reads that raced an invalidation are fenced by the cache
generation (see ``PinCache.put``).

Every entry is re-read after ``local_cache_ttl_s``, unless the store cannot be reached:
then the copy is served as it is, as long as its session was used within
``pin_ttl_s`` (the same TTL the store applies; an idle session expires here too).
A session this process holds no copy of cannot be served during an outage: its
lookup fails with ``StoreUnavailable`` (503 ``pin_store_unavailable``).

A cache miss reads the pin, the epoch key and the session's conflict mark in one
round trip (GETEX slides the TTL), and for a new session writes the pin the data
plane proposes in the same call (redis_lookup.py). The epoch tells a pin that expired
from a store that lost every pin; the mark reports, once, that a re-assertion conflict
changed the session's version. Cache hits cost no round trip; their TTL refreshes are
batched (redis_touch.py).

TTLs go in milliseconds (PX / PEXPIRE) so fractional ``pin_ttl_s`` works. Keys are bytes
(see redis_wire.py: no session id can collide with another or break its key). Each
call is bounded by ``op_timeout_ms`` whatever the injected client's settings and
measured (proxy/redis/call.py; the store's errors: redis_errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING, Any

from proxy.core.errors import StoreUnavailable
from proxy.redis.client import REDIS_FAILURES, sharded_pubsub_opener
from proxy.redis.pubsub import Subscriber
from proxy.store.base import Activity, Lookup
from proxy.store.cache import PinCache
from proxy.store.redis_changes import PinChanges
from proxy.store.redis_errors import decoded, store_call
from proxy.store.redis_invalidate import Invalidations
from proxy.store.redis_lookup import PinReader
from proxy.store.redis_sync import PinSync
from proxy.store.redis_touch import Touches
from proxy.store.redis_wire import StoreKeys, encode_pin, secrets_of

if TYPE_CHECKING:

    from redis.asyncio import Redis

    from proxy.config.store import StoreConfig
    from proxy.core.clock import Clock
    from proxy.core.models import Pin
    from proxy.redis.metrics import RedisMetrics
    from proxy.store.base import Propose
    from proxy.store.redis_sync import ConflictHook

_log = logging.getLogger(__name__)

_POLL_S = 0.5
_MAX_WRITE_BACKS = 1000  # pin-token write-backs in flight


def _no_conflict_hook(session_id: str, ours: Pin, stored: Pin) -> None:
    return None


class RedisPinStore:
    """``PinStore`` on Redis with a local cache, batched TTL touches and pub/sub invalidation."""

    def __init__(
        self,
        config: StoreConfig,
        client: Redis,
        clock: Clock,
        *,
        owns_client: bool = True,
        on_conflict: ConflictHook = _no_conflict_hook,
        metrics: RedisMetrics | None = None,
    ) -> None:
        """``metrics``: where its Redis calls are measured (None: not measured)."""
        self._config = config
        self._client = client
        self._owns_client = owns_client  # False: the composition root shares and closes it
        self._clock = clock
        self._prefix = config.key_prefix
        self._keys = StoreKeys(config.key_prefix, cluster=config.topology == "cluster")
        self._ttl_ms = max(1, round(config.pin_ttl_s * 1000))
        self._op_timeout_s = config.op_timeout_ms / 1000
        self._cache = PinCache(
            config.local_cache_size, config.local_cache_ttl_s, clock, idle_s=config.pin_ttl_s
        )
        self._subscribed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._writing_back: set[asyncio.Task[None]] = set()
        self._closed = False
        self._call = store_call(config, clock, metrics)
        self._reader = PinReader(client, self._keys, self._ttl_ms, self._op_timeout_s)
        self._changes = PinChanges(client, self._keys, config, clock, self._call, self._ttl_ms)
        self._sync = PinSync(
            client, self._keys, self._cache, config, clock, self._call, on_conflict=on_conflict
        )
        self._touches = Touches(
            client, self._keys, self._cache, config, clock, self._call,
            epoch_ok=self._sync.epoch_seen,
            periodic=self._sync.watch_servers if self._keys.cluster else None,
        )  # fmt: skip
        invalidations = Invalidations(
            self._cache, self._sync, self._subscribed, self._forget, secrets_of(config)
        )
        self._subscriber = Subscriber(
            client,
            self._keys.channel,
            clock=clock,
            rng=random.Random(),
            op_timeout_s=self._op_timeout_s,
            poll_s=_POLL_S,
            on_subscribed=invalidations.on_subscribed,
            on_messages=invalidations.on_messages,
            on_lost=invalidations.on_lost,
            on_quiet=invalidations.on_quiet,
            open_pubsub=sharded_pubsub_opener(config, client, self._keys.channel)
            if self._keys.cluster else None,
        )

    @property
    def subscribed(self) -> bool:
        """True while the invalidation subscription is confirmed."""
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

    @property
    def reader(self) -> PinReader:
        """The lookup script's runner (its batch counters for tests and the bench)."""
        return self._reader

    @property
    def sync(self) -> PinSync:
        """The repin-log replay and data-loss recovery (counters for tests and metrics)."""
        return self._sync

    def key(self, session_id: str) -> bytes:
        """The Redis key holding the session's pin."""
        return self._keys.pin(session_id)

    def pinned_key(self, version_key: str) -> bytes:
        """The sorted set of sessions pinned to ``version_key`` (see count_pinned)."""
        return self._keys.pinned(version_key)

    async def get(self, session_id: str) -> Pin | None:
        return (await self._find(session_id, consume_mark=False)).pin

    async def lookup(
        self, session_id: str, hint: Pin | None = None, propose: Propose | None = None
    ) -> Lookup:
        return await self._find(session_id, consume_mark=True, hint=hint, propose=propose)

    async def _find(
        self,
        session_id: str,
        *,
        consume_mark: bool,
        hint: Pin | None = None,
        propose: Propose | None = None,
    ) -> Lookup:
        self._check_open()
        cache = self._cache
        pin = cache.get(session_id)
        if pin is None and self._unreachable():
            pin = cache.stale(session_id)
        if pin is not None:
            self._touches.add(session_id, pin.version_key)
            return Lookup(pin)
        if hint is not None:
            # A valid pin token: the pin without a round trip, written back meanwhile.
            cache.put(session_id, hint)
            self._touches.add(session_id, hint.version_key)
            self._write_back(session_id, hint)
            return Lookup(hint)
        generation = cache.generation
        # A held copy must be re-asserted if the store lost data: read before writing.
        offer = propose() if propose is not None and cache.stale(session_id) is None else None
        try:
            raw, mark, epoch, created = await self._call(
                "get",
                self._reader.read(
                    session_id, consume_mark, None if offer is None else encode_pin(offer)
                ),
            )
        except StoreUnavailable:
            # Pins are immutable until an explicit repin: a copy beats a refusal.
            pin = cache.stale(session_id)
            if pin is None:
                raise
            self._touches.add(session_id, pin.version_key)
            return Lookup(pin)
        if created:
            assert offer is not None
            self._sync.epoch_seen(epoch)  # only to notice a loss: the new pin stands
            self._touches.add(session_id, offer.version_key)
            self._remember(session_id, offer, generation)
            return Lookup(offer, created=True)
        held = cache.stale(session_id)
        if not self._sync.epoch_seen(epoch) and held is not None:
            # The store lost data and this process holds the pin: write it back first.
            return await self._reasserted(session_id, held)
        if raw is None:
            cache.evict(session_id)
            return Lookup(None, lost_data_s_ago=self._sync.lost_data_s_ago())
        pin = decoded(session_id, raw)
        self._remember(session_id, pin, generation)
        # GETEX slid the TTL, but the session's last use (the per-version sorted set
        # that count_pinned and activity read) is only recorded by the touch batch.
        self._touches.used(session_id, pin.version_key)
        if isinstance(mark, bytes) and mark.decode() != pin.version_key:
            return Lookup(pin, changed_from=mark.decode())
        return Lookup(pin)

    async def _reasserted(self, session_id: str, held: Pin) -> Lookup:
        pin, written = await self._pin_if_absent(session_id, held)
        if written:
            # A write-back like the background re-assertion's (redis_sync.py): whichever
            # of the two gets there first writes it, and it is counted once.
            self._sync.reasserted += 1
        if pin.version_key == held.version_key:
            return Lookup(pin)
        return Lookup(pin, changed_from=held.version_key)

    def _write_back(self, session_id: str, pin: Pin) -> None:
        """Pin-if-absent in the background (bounded: past the bound the next request
        with the token tries again, once the touch batch has found no key)."""
        if len(self._writing_back) >= _MAX_WRITE_BACKS:
            return

        async def write() -> None:
            try:
                await self.pin_if_absent(session_id, pin)
            except StoreUnavailable as exc:
                _log.debug("pin token write-back failed: %s", exc.message)

        task = asyncio.create_task(write(), name="pinstore-write-back")
        self._writing_back.add(task)
        task.add_done_callback(self._writing_back.discard)

    async def pin_if_absent(self, session_id: str, pin: Pin) -> Pin:
        return (await self._pin_if_absent(session_id, pin))[0]

    async def _pin_if_absent(self, session_id: str, pin: Pin) -> tuple[Pin, bool]:
        """The session's pin after the call, and whether this call wrote it."""
        self._check_open()
        generation = self._cache.generation
        raw = await self._call(
            "pin",
            self._client.set(
                self._keys.pin(session_id), encode_pin(pin), px=self._ttl_ms, nx=True, get=True
            ),
        )
        winner = pin if raw is None else decoded(session_id, raw)
        # A pin that was read rather than written gets its TTL slid like any hit; either
        # way the next batch records the session under its version (count_pinned).
        self._touches.add(session_id, winner.version_key)
        self._remember(session_id, winner, generation)
        return winner, raw is None

    async def repin(self, session_id: str, pin: Pin) -> Pin | None:
        self._check_open()
        try:
            return await self._changes.repin(session_id, pin)
        finally:
            # Even a failed write may have been applied (a timeout after sending).
            self._forget(session_id)

    async def unpin(self, session_id: str) -> Pin | None:
        self._check_open()
        try:
            return await self._changes.unpin(session_id)
        finally:
            self._forget(session_id)

    def _forget(self, session_id: str) -> None:
        self._cache.evict(session_id)
        self._touches.drop(session_id)

    async def count_pinned(self, version_key: str) -> int:
        self._check_open()
        # This replica's pending uses first, so its own sessions are counted exactly.
        await self.flush_touches()
        since = self._clock.time() - self._config.pin_ttl_s
        count = await self._call(
            "count", self._client.zcount(self._keys.pinned(version_key), since, "+inf")
        )
        return int(count)

    async def activity(self, version_key: str, window_s: float) -> Activity:
        self._check_open()
        await self.flush_touches()
        now = self._clock.time()
        key = self._keys.pinned(version_key)

        async def read() -> list[Any]:
            # Scores are each session's last use (the touch batches), so one ZCOUNT
            # and the top entry answer both questions for every replica's sessions.
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zcount(key, now - window_s, "+inf")
                pipe.zrevrangebyscore(key, "+inf", now - self._config.pin_ttl_s,
                                      start=0, num=1, withscores=True)
                return await pipe.execute()

        active, newest = await self._call("activity", read())
        return Activity(active=int(active), last_used_at=float(newest[0][1]) if newest else None)

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
            asyncio.create_task(
                self._touches.run(lambda: self._closed), name=f"pinstore-touch:{self._prefix}"
            ),
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
        await self._reader.close()
        await self._sync.close()
        if self._writing_back:
            await asyncio.wait(list(self._writing_back), timeout=2 * self._op_timeout_s)
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
            with contextlib.suppress(*REDIS_FAILURES):
                await self._client.aclose()

    async def flush_touches(self) -> None:
        """Send the pending TTL refreshes now; evict local copies whose key is gone."""
        await self._touches.flush()

    def _remember(self, session_id: str, pin: Pin, generation: int) -> None:
        self._cache.put(session_id, pin, generation)

    def _unreachable(self) -> bool:
        """Asking the store first would only delay the answer by a timeout."""
        return self._call.failing or not self._subscribed.is_set()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the pin store is closed")

    def __repr__(self) -> str:
        return (
            f"RedisPinStore(prefix={self._prefix!r}, url={self._config.masked_url()!r}, "
            f"cached={len(self._cache)}, pending_touches={len(self._touches)}, "
            f"subscribed={self._subscribed.is_set()}, closed={self._closed})"
        )
