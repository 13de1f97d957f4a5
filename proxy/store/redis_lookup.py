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
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, NamedTuple

from redis.exceptions import NoScriptError

if TYPE_CHECKING:
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


class PinReader:
    """Runs the lookup script for the pin store (inside its ``RedisCall``)."""

    __slots__ = ("_client", "_keys", "_ttl")

    def __init__(self, client: Redis, keys: StoreKeys, ttl_ms: int) -> None:
        self._client = client
        self._keys = keys
        self._ttl = str(ttl_ms).encode()

    async def read(self, session_id: str, consume_mark: bool, offer: bytes | None) -> Found:
        """The pin, mark and epoch; with ``offer``, the offer written if no pin was held."""
        keys = self._keys
        args: list[bytes] = [self._ttl, b"1" if consume_mark else b"0"]
        if offer is not None:
            args.append(offer)
        pin, mark = keys.pin(session_id), keys.changed(session_id)
        if not keys.cluster:
            reply = await self._script(3, pin, mark, keys.epoch, *args)
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
