"""A cache miss in one round trip: the pin looked up, and written if absent, by one script.

Theory of operation
-------------------
A session the local cache does not hold costs one call to Redis, whatever happens
next: a Lua script (EVALSHA; the script is sent with EVAL when the server answers
NOSCRIPT: after a restart, a failover, SCRIPT FLUSH) that, atomically,

1. reads the pin and slides its TTL (GETEX PX),
2. if there is none and the caller offered one, writes it (inside the script nothing
   can come between the read and the write: this is pin-if-absent, and of two
   replicas offering different pins for one new session exactly one is written and
   the other reads it),
3. reads the session's conflict mark (GETDEL when the answer will carry it, else GET),
4. reads the epoch key (lost-data detection, redis_sync.py).

Before, a new session cost two round trips (the read pipeline, then SET NX) through
redis-py, each ~200 µs of client CPU. The offer is only made when the session's
answer would be an ordinary new pin if none is found (the data plane's lost-pin rules
and a held copy to re-assert both need the read first: then no offer, and the two
steps as before).

Every key of one script must be in one slot on a cluster: the pin and the mark share
the session's hash tag, but the epoch lives in the ``{sync}`` slot, so there the
script reads the pin and mark and the epoch is read beside it in the same pipeline
(one round trip per node, sent together).

Lookups that start in the same turn of the event loop go out together (standalone and
Sentinel): the first one queued schedules a send for the loop's next turn, so every
request the loop's current turn is running can join, and the queued scripts go in one
pipeline (one connection, one write, one read), each still its own atomic script with
its own answer. One call through redis-py costs ~90 µs of client CPU (the pool, the
packing, a write and a read, each wake-up of the other process), most of it per call
rather than per command, and a new session's lookup was the largest single item in a
stream's start and in the CPU of a mix of new sessions (bench/RESULTS.md, issue 14,
2026-12-06). A lone lookup is sent as it always was; the batch has its own deadline
(the callers' own, lag-tolerant, from the batch's start), each caller keeps its own
(RedisCall), and a caller that gives up leaves the others' answers alone.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING, Any, NamedTuple

from redis.exceptions import NoScriptError

from proxy.redis.call import LagTolerantDeadline

if TYPE_CHECKING:
    from typing import TypeAlias

    from redis.asyncio import Redis

    from proxy.store.redis_wire import StoreKeys

# KEYS: pin, mark[, epoch]. ARGV: TTL in ms, "1" to consume the mark[, the pin to write].
# A Lua false becomes a nil reply, and unlike nil it keeps its place in the table.
LOOKUP_SCRIPT = b"""
local pin = redis.call('GETEX', KEYS[1], 'PX', ARGV[1])
local created = 0
if not pin and ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[1])
  created = 1
end
local mark
if ARGV[2] == '1' then
  mark = redis.call('GETDEL', KEYS[2])
else
  mark = redis.call('GET', KEYS[2])
end
local epoch = false
if KEYS[3] then
  epoch = redis.call('GET', KEYS[3])
end
return {pin, mark, epoch, created}
"""
LOOKUP_SHA = hashlib.sha1(LOOKUP_SCRIPT).hexdigest()


class Found(NamedTuple):
    """The script's answer: the stored pin document (or the offer, if ``created``)."""

    raw: object
    mark: object
    epoch: object
    created: bool


Queued: TypeAlias = "tuple[tuple[bytes, ...], asyncio.Future[Any]]"


class PinReader:
    """Runs the lookup script for the pin store (inside its ``RedisCall``)."""

    __slots__ = (
        "_client",
        "_closed",
        "_keys",
        "_queued",
        "_sending",
        "_timeout_s",
        "_ttl",
        "batched",
        "batches",
        "sent",
    )

    def __init__(self, client: Redis, keys: StoreKeys, ttl_ms: int, timeout_s: float) -> None:
        """``timeout_s``: how long one batch of lookups may take (the store's op timeout)."""
        self._client = client
        self._keys = keys
        self._ttl = str(ttl_ms).encode()
        self._timeout_s = timeout_s
        self._queued: list[Queued] = []  # (KEYS and ARGV, the caller's future)
        self._sending: set[asyncio.Task[None]] = set()
        self._closed = False
        self.sent = 0  # lookups handed to redis-py, alone or in a batch (tests, bench)
        self.batches = 0  # sends of more than one lookup that were answered
        self.batched = 0  # lookups those sends carried

    async def read(self, session_id: str, consume_mark: bool, offer: bytes | None) -> Found:
        """The pin, mark and epoch; with ``offer``, the offer written if no pin was held."""
        keys = self._keys
        args: list[bytes] = [self._ttl, b"1" if consume_mark else b"0"]
        if offer is not None:
            args.append(offer)
        pin, mark = keys.pin(session_id), keys.changed(session_id)
        if not keys.cluster:
            reply = await self._joined((pin, mark, keys.epoch, *args))
            return Found(reply[0], reply[1], reply[2], reply[3] == 1)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.execute_command("EVALSHA", LOOKUP_SHA, 2, pin, mark, *args)
            pipe.get(keys.epoch)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        reply, epoch = replies
        if isinstance(reply, NoScriptError):
            reply = await self._eval(2, pin, mark, *args)
        for value in (reply, epoch):
            if isinstance(value, Exception):
                raise value
        return Found(reply[0], reply[1], epoch, reply[3] == 1)

    async def close(self) -> None:
        """Stop sending: queued and in-flight lookups fail (their callers are told)."""
        self._closed = True
        for task in list(self._sending):
            task.cancel()
        if self._sending:
            await asyncio.wait(list(self._sending), timeout=2 * self._timeout_s + 1.0)
        self._fail(self._queued, ConnectionError("the pin store is closed"))
        self._queued = []

    async def _joined(self, keys_and_args: tuple[bytes, ...]) -> Any:
        """The script's reply for three keys, sent with every lookup of this loop turn."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._send_queued)
        self._queued.append((keys_and_args, future))
        # A caller that gives up cancels its own future only; the batch goes on.
        return await future

    def _send_queued(self) -> None:
        queued = [(what, future) for what, future in self._queued if not future.done()]
        self._queued = []
        if self._closed:
            self._fail(queued, ConnectionError("the pin store is closed"))
            return
        if not queued:
            return
        task = asyncio.get_running_loop().create_task(self._send(queued))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, queued: list[Queued]) -> None:
        self.sent += len(queued)
        try:
            # Bounded like each caller's own call (RedisCall: lag-tolerant), from the
            # batch's start, so just after the earliest caller's deadline: a batch that
            # gets no answer is cancelled then, and its connection let go, as a lone
            # call's is.
            async with asyncio.timeout(None) as timeout:
                deadline = LagTolerantDeadline(timeout, self._timeout_s)
                try:
                    if len(queued) == 1:
                        (what, future), = queued
                        reply = await self._script(3, *what)
                        if not future.done():
                            future.set_result(reply)
                        return
                    replies = await self._pipelined([what for what, _ in queued])
                finally:
                    deadline.cancel()
        except asyncio.CancelledError:
            self._fail(queued, ConnectionError("the pin store is closed"))
            raise
        except Exception as exc:  # every caller gets it, as its own call would have
            self._fail(queued, exc)
            return
        self.batches += 1
        self.batched += len(queued)
        for (_, future), reply in zip(queued, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _pipelined(self, batch: list[tuple[bytes, ...]]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for what in batch:
                pipe.execute_command("EVALSHA", LOOKUP_SHA, 3, *what)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        for i, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                # Not cached on this server (a restart, a failover): the first EVAL
                # caches it; each lookup still runs its own script.
                replies[i] = await self._eval(3, *batch[i])
        return replies

    @staticmethod
    def _fail(queued: list[Queued], exc: BaseException) -> None:
        for _, future in queued:
            if not future.done():
                future.set_exception(exc)

    async def _script(self, numkeys: int, *keys_and_args: bytes) -> Any:
        try:
            return await self._client.execute_command(  # type: ignore[no-untyped-call]  # untyped
                "EVALSHA", LOOKUP_SHA, numkeys, *keys_and_args
            )
        except NoScriptError:
            return await self._eval(numkeys, *keys_and_args)

    async def _eval(self, numkeys: int, *keys_and_args: bytes) -> Any:
        # Not cached on this server (yet, or any more): EVAL sends it and caches it.
        return await self._client.execute_command(  # type: ignore[no-untyped-call]
            "EVAL", LOOKUP_SCRIPT, numkeys, *keys_and_args
        )
