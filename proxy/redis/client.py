"""The one Redis client of a process, for each topology: standalone, Sentinel, Cluster.

Every client gets the same discipline whatever the topology: calls bounded by
``op_timeout_ms``, one retry on a broken connection only (after a restart or a
failover every pooled connection is dead, and the first command on each would
otherwise fail although Redis is back; a timeout is never retried, so the op timeout
still bounds a call), a bounded pool, the ACL user and password, and TLS with the
configured CA and client certificate for ``rediss://``.

The bound is the call helper's (proxy/redis/call.py: every call goes through it, and
redis-py closes a connection whose command was cancelled mid-way). Standalone and
Sentinel connections therefore get no socket timeout of their own: redis-py would put a
second timer on every command, and on Python 3.11 a task per write (``wait_for`` around
the drain), about 50 µs of CPU per call measured by bench/micro_store.py. Connecting
keeps its timeout, and so do the sentinels' own connections and the cluster client,
whose slot-map refresh after a failover is driven by its own timeouts. Pub/sub reads
pass their own timeouts (proxy/redis/pubsub.py).

- Standalone: a blocking pool on ``url`` (a burst, such as a cold start or every
  connection dropped by a restart, queues on a few connections instead of opening one
  per request).
- Sentinel: the master named ``sentinel_master``, looked up through the sentinels for
  each new connection; a failover closes the connections to the old master.
- Cluster: ``RedisCluster`` from the node at ``url``, following MOVED/ASK redirects and
  refreshing the slot map on failover.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from redis.asyncio.client import PubSub

    from proxy.config.store import StoreConfig

    PubSubOpener = Callable[[], Awaitable[PubSub]]

# What a Redis call can raise when the store fails: redis-py's errors (a cluster's slot
# map errors are not RedisErrors), OSError, which covers asyncio's TimeoutError, and
# what redis-py 8's cluster client lets through when a master is killed under it:
# AttributeError (the connection's writer already gone) and RuntimeError (uvloop:
# "unable to perform operation on <TCPTransport closed=True>"), both seen in the
# cluster fault test. Caught only around calls into redis-py.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, AttributeError, RuntimeError)

_HEALTH_CHECK_INTERVAL_S = 15
_MAX_CONNECTIONS = 64  # per process (per node on a cluster); one is the subscription
# redis-py builds a DriverInfo for every new connection, and without one given reads its
# own version from the installed package's metadata each time: ~1 ms of event-loop time
# per connection, paid 64 times in the burst after a start or a failover. The same name
# and version, read once, go to CLIENT SETINFO as before.
_DRIVER_INFO = DriverInfo()


def _retry() -> Retry:
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def _tls(config: StoreConfig) -> dict[str, Any]:
    if not config.tls:
        return {}
    tls: dict[str, Any] = {"ssl_cert_reqs": "required"}
    if config.ca_file is not None:
        tls["ssl_ca_certs"] = str(config.ca_file)
    if config.client_cert_file is not None:
        tls["ssl_certfile"] = str(config.client_cert_file)
        if config.client_key_file is not None:
            tls["ssl_keyfile"] = str(config.client_key_file)
    return tls


def _credentials(config: StoreConfig) -> dict[str, Any]:
    parts = urlsplit(config.url)
    out: dict[str, Any] = {}
    username = config.username or (unquote(parts.username) if parts.username else None)
    if username:
        out["username"] = username
    if config.password is not None:
        out["password"] = config.password.get_secret_value()
    elif parts.password is not None:
        out["password"] = unquote(parts.password)
    return out


def redis_client_from_config(config: StoreConfig) -> Redis:
    """A client for the configured topology (see the module docstring).

    A cluster client is returned as ``Redis``: it offers the same commands, pipelines
    and pub/sub that pinproxy uses, and the store keeps every transaction in one slot.
    """
    timeout_s = config.op_timeout_ms / 1000
    common: dict[str, Any] = {
        "socket_timeout": None,  # bounded per call by RedisCall (see the module docstring)
        "socket_connect_timeout": timeout_s,
        "retry": _retry(),
        "decode_responses": False,
        "driver_info": _DRIVER_INFO,
        **_tls(config),
    }
    if config.topology == "sentinel":
        return _sentinel_master(config, common)
    if config.topology == "cluster":
        parts = urlsplit(config.url)
        cluster = RedisCluster(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            ssl=config.tls,
            max_connections=_MAX_CONNECTIONS,
            **{k: v for k, v in common.items() if k not in ("retry", "socket_timeout")},
            socket_timeout=timeout_s,
            **_credentials(config),
        )
        return cast("Redis", cluster)
    extra: dict[str, Any] = {}
    if config.username is not None:
        extra["username"] = config.username
    if config.password is not None:
        extra["password"] = config.password.get_secret_value()
    pool = BlockingConnectionPool.from_url(
        config.url,
        max_connections=_MAX_CONNECTIONS,
        timeout=timeout_s,
        health_check_interval=_HEALTH_CHECK_INTERVAL_S,
        **common,
        **extra,
    )
    return Redis.from_pool(pool)


def _sentinel_master(config: StoreConfig, common: dict[str, Any]) -> Redis:
    parts = urlsplit(config.url)
    db = int(parts.path.strip("/") or 0) if parts.path.strip("/").isdigit() else 0
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": common["socket_connect_timeout"],  # the sentinels' own queries
        "socket_connect_timeout": common["socket_connect_timeout"],
        **_tls(config),
    }
    if config.tls:
        sentinel_kwargs["ssl"] = True
    if config.sentinel_password is not None:
        sentinel_kwargs["password"] = config.sentinel_password.get_secret_value()
    addresses = []
    for address in config.sentinels:
        host, _, port = address.rpartition(":")
        addresses.append((host.strip("[]"), int(port)))
    sentinel = Sentinel(addresses, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    assert config.sentinel_master is not None  # the settings validator requires it
    master: Redis = sentinel.master_for(
        config.sentinel_master,
        db=db,
        ssl=config.tls,
        max_connections=_MAX_CONNECTIONS,
        health_check_interval=_HEALTH_CHECK_INTERVAL_S,
        **common,
        **_credentials(config),
    )
    return master


def node_client(config: StoreConfig, host: str, port: int) -> Redis:
    """A plain client for one cluster node (its sharded pub/sub), with the same
    timeouts, credentials and TLS as the cluster client."""
    timeout_s = config.op_timeout_ms / 1000
    return Redis(
        host=host,
        port=port,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=_retry(),
        ssl=config.tls,
        **_tls(config),
        **_credentials(config),
    )


def sharded_pubsub_opener(config: StoreConfig, client: Redis, channel: bytes) -> PubSubOpener:
    """Opens a pub/sub connection to the primary serving ``channel``'s slot.

    Sharded pub/sub (SSUBSCRIBE, Redis >= 7) keeps a cluster's invalidations on one
    shard instead of broadcasting every message over the cluster bus to every node.
    Each (re)connection asks the slot map again, refreshed after a failure, so a
    failover or a slot migration moves the subscription to the new owner.
    """
    cluster = cast("RedisCluster", client)
    opened = False

    async def open_pubsub() -> PubSub:
        nonlocal opened
        if opened:
            # A reconnection follows a failure: the slot's owner may have changed.
            await cluster.nodes_manager.initialize()
        else:
            await cluster.initialize()
        opened = True
        node = cluster.get_node_from_key(channel.decode("utf-8", "surrogateescape"))
        if node is None:
            raise RedisConnectionError(f"no node serves the slot of {channel!r}")
        return node_client(config, node.host, int(node.port)).pubsub()

    return open_pubsub
