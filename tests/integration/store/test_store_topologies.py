"""Sentinel, Cluster, TLS and ACL: the pin store on each topology, and failover under traffic."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import aiohttp
import pytest
import redis as sync_redis
import trustme
from pydantic import SecretStr

from proxy.config.store import StoreConfig
from proxy.core.clock import SystemClock
from proxy.core.errors import StoreUnavailable
from proxy.store.redis import RedisPinStore
from proxy.store.redis_wire import StoreKeys, redis_client_from_config
from tests.fixtures.proxy import free_port
from tests.fixtures.redis_server import RedisServer
from tests.integration.store.test_redis_store import eventually, pin
from tests.integration.store.test_store_faults import (
    BUDGET_S,
    check_replicas,
    run_fault,
    start_fleet,
    store_toml,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.fixtures.proxy import ProxyProcess
    from tests.fixtures.redis_topologies import RedisCluster3, SentinelSet
    from tests.fixtures.sim import StartPop


async def test_a_sentinel_failover_under_traffic_changes_no_session_version(
    start_pop: StartPop, proxy_processes: Callable[..., ProxyProcess],
    sentinel_set: SentinelSet, http: aiohttp.ClientSession,
) -> None:
    store = store_toml(
        "redis://ignored/0", topology='"sentinel"', sentinel_master='"pinmaster"',
        sentinels=json.dumps(sentinel_set.addresses),
    )
    replicas, sessions, answers = await start_fleet(start_pop, proxy_processes, store, http)
    old_master = sentinel_set.master_port()
    recovery_s = await run_fault(
        http, replicas, sessions, answers, sentinel_set.fail_primary, lambda: None, 0.0
    )
    assert sentinel_set.master_port() != old_master
    assert answers.mixed() == {}
    assert answers.slowest_s < BUDGET_S, answers
    assert recovery_s < 5.0
    assert set(answers.statuses) <= {"200", "503 pin_store_unavailable", "503 pin_lost"}, answers
    await check_replicas(http, replicas)


async def _working(config: StoreConfig) -> RedisPinStore:
    store = RedisPinStore(config, redis_client_from_config(config), SystemClock())
    await store.start()
    return store


async def test_tls_with_a_private_ca_and_a_client_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_pem, ca_pem = tmp_path / "server.pem", tmp_path / "ca.pem"
    client_pem = tmp_path / "client.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(server_pem)
    ca.issue_cert("pinproxy-client").private_key_and_cert_chain_pem.write_to_path(client_pem)
    ca.cert_pem.write_to_path(ca_pem)
    tls_port = free_port()
    args = ("--tls-port", str(tls_port), "--tls-cert-file", str(server_pem),
            "--tls-key-file", str(server_pem), "--tls-ca-cert-file", str(ca_pem),
            "--tls-auth-clients", "yes")
    with RedisServer(extra_args=args):
        url = f"rediss://127.0.0.1:{tls_port}/0"
        store = await _working(StoreConfig(kind="redis", url=url, ca_file=ca_pem,
                                           client_cert_file=client_pem, op_timeout_ms=1000))
        try:
            assert store.subscribed
            assert await store.pin_if_absent("s", pin(1)) == pin(1)
        finally:
            await store.close()
        for refused in (
            StoreConfig(kind="redis", url=url, ca_file=ca_pem),  # no client certificate
            StoreConfig(kind="redis", url=url, client_cert_file=client_pem),  # CA not trusted
        ):
            bad = RedisPinStore(refused, redis_client_from_config(refused), SystemClock())
            with pytest.raises(StoreUnavailable):
                await bad.ping()
            await bad.close()


async def test_an_acl_user_and_password_are_used_and_never_shown(tmp_path: Path) -> None:
    args = ("--user", "default", "off", "--user", "pinproxy", "on", ">acl-s3cret",
            "~t:*", "&*", "+@all")
    with RedisServer(extra_args=args) as server:
        good = StoreConfig(kind="redis", url=server.url, key_prefix="t:", username="pinproxy",
                           password=SecretStr("acl-s3cret"))
        store = await _working(good)
        try:
            assert store.subscribed
            assert await store.pin_if_absent("s", pin(1)) == pin(1)
        finally:
            await store.close()
        wrong = StoreConfig(kind="redis",
                            url=f"redis://pinproxy:wrong-acl@127.0.0.1:{server.port}/0")
        bad = RedisPinStore(wrong, redis_client_from_config(wrong), SystemClock())
        with pytest.raises(StoreUnavailable) as info:
            await bad.ping()
        assert "wrong-acl" not in f"{info.value.message} {bad!r}"
        await bad.close()


def test_topology_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="needs sentinels and sentinel_master"):
        StoreConfig(kind="redis", topology="sentinel", sentinels=("127.0.0.1:26379",))
    with pytest.raises(ValueError, match="is not host:port"):
        StoreConfig(kind="redis", topology="sentinel", sentinels=("nowhere",),
                    sentinel_master="m")
    with pytest.raises(ValueError, match="need topology 'sentinel'"):
        StoreConfig(kind="redis", sentinel_master="m")
    with pytest.raises(ValueError, match="need a rediss:// url"):
        StoreConfig(kind="redis", ca_file=__file__)
    with pytest.raises(ValueError, match="hash tags"):
        StoreConfig(kind="redis", key_prefix="{p}:")
    config = StoreConfig(kind="redis", topology="sentinel", sentinel_master="m",
                         sentinels=("127.0.0.1:26379", "[::1]:26380"))
    assert config.describe() == "sentinel master 'm' via 127.0.0.1:26379,[::1]:26380"


async def test_on_a_cluster_a_sessions_keys_share_a_slot_and_repins_reach_every_replica(
    redis_cluster: RedisCluster3,
) -> None:
    config = StoreConfig(kind="redis", topology="cluster", url=redis_cluster.url,
                         key_prefix="t:", touch_interval_s=0.1, op_timeout_ms=1000)
    one, two = await _working(config), await _working(config)
    try:
        assert one.subscribed
        assert two.subscribed
        for n in range(20):
            assert await one.pin_if_absent(f"s{n}", pin(1)) == pin(1)
        assert await two.get("s7") == pin(1)
        assert await one.repin("s7", pin(2)) == pin(1)

        async def invalidated() -> bool:
            return await two.get("s7") == pin(2)

        await eventually(invalidated, within_s=2.0)
        keys = StoreKeys("t:", cluster=True)
        assert keys.pin("s7") == b"t:pin:{s7}"
        slots = {redis_cluster.slot(key) for key in
                 (keys.pin("s7"), keys.changed("s7"), b"t:audit:{s7}")}
        assert len(slots) == 1
        # The 20 sessions spread over the three masters.
        assert len({redis_cluster.master_of(keys.pin(f"s{n}")).port for n in range(20)}) == 3
        # A new session in one call: the script on the session's slot, the epoch beside
        # it; then again after the script cache is flushed everywhere (NOSCRIPT).
        found = await one.lookup("new", propose=lambda: pin(3))
        assert (found.pin, found.created) == (pin(3), True)
        found = await two.lookup("new", propose=lambda: pin(4))
        assert (found.pin, found.created) == (pin(3), False)
        for node in redis_cluster.nodes:
            with sync_redis.Redis(port=node.port, socket_timeout=1.0) as client:
                client.script_flush()
        found = await two.lookup("newer", propose=lambda: pin(4))
        assert (found.pin, found.created) == (pin(4), True)
        await one.flush_touches()  # pipelined over the three masters
        assert await two.count_pinned(pin(1).version_key) == 19
        assert await two.count_pinned(pin(2).version_key) == 1
    finally:
        await one.close()
        await two.close()


async def test_a_cluster_master_killed_under_traffic_changes_no_session_version(
    start_pop: StartPop, proxy_processes: Callable[..., ProxyProcess],
    redis_cluster: RedisCluster3, http: aiohttp.ClientSession,
) -> None:
    store = store_toml(redis_cluster.url, topology='"cluster"')
    replicas, sessions, answers = await start_fleet(start_pop, proxy_processes, store, http)
    # The shard holding the repin log and the invalidation channel: the hardest one.
    recovery_s = await run_fault(
        http, replicas, sessions, answers,
        lambda: redis_cluster.fail_master_of(b"pinproxy:{sync}invalidate"), lambda: None, 0.0,
    )
    assert answers.mixed() == {}
    assert answers.slowest_s < BUDGET_S, answers
    assert recovery_s < 5.0
    assert set(answers.statuses) <= {"200", "503 pin_store_unavailable", "503 pin_lost"}, answers
    await check_replicas(http, replicas)


async def test_pooled_connections_share_one_driver_info_read_once(redis_url: str) -> None:
    # redis-py reads its version from package metadata for each new connection unless
    # given one (~1 ms each, 64 times in the burst after a start or a failover): the
    # client passes one DriverInfo, built at import, to every connection it opens.
    import asyncio

    import redis

    client = redis_client_from_config(StoreConfig(kind="redis", url=redis_url))
    pool = client.connection_pool
    try:
        await asyncio.gather(*(client.ping() for _ in range(8)))
        # redis-py leaves get_connection unannotated (it is wrapped by deprecated_args).
        connections = [
            await pool.get_connection()  # type: ignore[no-untyped-call]
            for _ in range(8)
        ]
        try:
            infos = {id(c.driver_info): c.driver_info for c in connections}
        finally:
            for connection in connections:
                await pool.release(connection)
        [info] = infos.values()
        assert (info.name, info.lib_version) == ("redis-py", redis.__version__)
        again = redis_client_from_config(StoreConfig(kind="redis", url=redis_url))
        try:
            assert again.connection_pool.connection_kwargs["driver_info"] is info
        finally:
            await again.aclose()
    finally:
        await client.aclose()
