"""Shared pytest configuration; fixtures live in tests/fixtures/ as plugins."""

pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.redis_topologies",
    "tests.fixtures.sim",
    "tests.fixtures.proxy",
    "tests.fixtures.raw_backend",
]
