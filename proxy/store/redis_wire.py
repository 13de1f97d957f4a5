"""What pinproxy keeps in Redis, and how it connects: client settings, pin documents.

A pin is a small JSON document (``encode_pin``/``decode_pin``); the pinned-count sorted
sets hold each session id as a member, encoded like its key. Session ids become bytes
with ``surrogatepass`` UTF-8, which is injective and defined for every Python string,
and Redis keys are binary-safe, so no session id can collide with another or break
its key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.models import Pin

if TYPE_CHECKING:
    from proxy.config import StoreConfig

_TEXT_FIELDS = ("version_key", "backend_id", "region")  # Pin's fields before pinned_at
_HEALTH_CHECK_INTERVAL_S = 15
_MAX_CONNECTIONS = 64  # per process; one is the invalidation subscription


def redis_client_from_config(config: StoreConfig) -> Redis:
    """A client for ``config.url``: op-timeout sockets, no hidden retries, a bounded pool."""
    timeout_s = config.op_timeout_ms / 1000
    extra: dict[str, Any] = {}
    if config.password is not None:
        extra["password"] = config.password.get_secret_value()
    # redis-py retries 3 times with backoff by default, which would multiply the op
    # timeout; a failed pin lookup should surface at once as a 503 instead. One retry
    # on a broken connection only: after a Redis restart every pooled connection is
    # dead, and the first command on each would otherwise fail although Redis is
    # back (a timeout is never retried, so the op timeout still bounds a call). The pool is
    # bounded so that a burst (cold start, every connection dropped by a Redis restart)
    # queues on a few connections instead of opening one per request.
    pool = BlockingConnectionPool.from_url(
        config.url,
        max_connections=_MAX_CONNECTIONS,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=_HEALTH_CHECK_INTERVAL_S,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        decode_responses=False,
        **extra,
    )
    return Redis.from_pool(pool)


class StoreKeys:
    """Every Redis key and channel name the pin store uses, under one prefix.

    ``<prefix>pin:<session>`` holds a pin, ``<prefix>changed:<session>`` the version a
    session lost in a re-assertion conflict (read once, by its next answer),
    ``<prefix>pinned:<version key>`` the sorted set of sessions per version,
    ``<prefix>repins`` the capped stream of repins and unpins (replayed by a replica
    that reconnects), ``<prefix>epoch`` the token whose disappearance means the store
    lost its data, and ``<prefix>invalidate`` the pub/sub channel.
    """

    __slots__ = ("_changed", "_pin", "_pinned", "channel", "epoch", "log")

    def __init__(self, prefix: str) -> None:
        raw = prefix.encode()
        self._pin = raw + b"pin:"
        self._changed = raw + b"changed:"
        self._pinned = raw + b"pinned:"
        self.log = raw + b"repins"
        self.epoch = raw + b"epoch"
        self.channel = raw + b"invalidate"

    def pin(self, session_id: str) -> bytes:
        return self._pin + member(session_id)

    def changed(self, session_id: str) -> bytes:
        return self._changed + member(session_id)

    def pinned(self, version_key: str) -> bytes:
        return self._pinned + version_key.encode()


def encode_pin(pin: Pin) -> bytes:
    document = {name: getattr(pin, name) for name in _TEXT_FIELDS}
    return orjson.dumps({**document, "pinned_at": pin.pinned_at})


def decode_pin(raw: object) -> Pin:
    """The pin in a stored document; ``ValueError`` when it is not one."""
    # orjson.JSONDecodeError is a ValueError too.
    data = orjson.loads(raw) if isinstance(raw, bytes | str) else None
    if not isinstance(data, dict) or not isinstance(data.get("pinned_at"), float | int):
        raise ValueError("not a pin document")
    version_key, backend_id, region = (data.get(name) for name in _TEXT_FIELDS)
    if not (isinstance(version_key, str) and isinstance(backend_id, str)):
        raise ValueError("not a pin document")
    if not isinstance(region, str):
        raise ValueError("not a pin document")
    return Pin(version_key, backend_id, region, float(data["pinned_at"]))


def member(session_id: str) -> bytes:
    """A session's member in the pinned-count sorted sets (the id, as in its pin key)."""
    return session_id.encode("utf-8", "surrogatepass")


def secrets_of(config: StoreConfig) -> tuple[str, ...]:
    """The password(s) in the store's settings, to scrub from error messages."""
    secrets = []
    if config.password is not None and config.password.get_secret_value():
        secrets.append(config.password.get_secret_value())
    url_password = urlsplit(config.url).password
    if url_password:
        secrets.append(url_password)
    return tuple(secrets)


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every secret replaced by ``***`` (error messages may quote a URL)."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
