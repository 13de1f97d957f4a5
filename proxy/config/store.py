"""The pin store's settings: which Redis topology, how to reach it, how pins are kept.

A section of ``proxy.config.Settings`` (which re-exports it). Topologies:

- ``standalone``: one server at ``url`` (``redis://``, ``rediss://`` for TLS, ``unix://``).
- ``sentinel``: the master named ``sentinel_master``, found through ``sentinels``
  (``host:port`` each); ``url`` still gives the scheme (``rediss://``: TLS to master and
  sentinels), the database, and any credentials for the master.
- ``cluster``: a Redis Cluster reached through the node at ``url`` (the others are
  discovered); keys carry a hash tag per session so a session's keys share a slot.

``username``/``password`` are the ACL user (or ``redis://user:pass@host``);
``ca_file``/``client_cert_file``/``client_key_file`` configure TLS (``rediss://``).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator

from proxy.config.observability import Section

_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")


class StoreConfig(Section):
    kind: Literal["memory", "redis"] = "memory"
    topology: Literal["standalone", "sentinel", "cluster"] = "standalone"
    url: str = "redis://127.0.0.1:6379/0"
    username: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    password: SecretStr | None = None
    sentinels: tuple[str, ...] = ()
    sentinel_master: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    sentinel_password: SecretStr | None = None  # when the sentinels require their own
    ca_file: FilePath | None = None
    client_cert_file: FilePath | None = None
    client_key_file: FilePath | None = None
    key_prefix: Annotated[str, Field(min_length=1, max_length=64)] = "pinproxy:"
    pin_ttl_s: Annotated[float, Field(gt=0)] = 86400.0
    # Pins are immutable except by explicit repin (which is broadcast), so a local copy
    # can be trusted; it is re-read from the store after this long anyway, to notice a
    # pin that expired in the store while this process kept using its copy.
    local_cache_size: Annotated[int, Field(ge=0)] = 100_000
    local_cache_ttl_s: Annotated[float, Field(gt=0)] = 60.0
    # How often batched TTL refreshes for cache-hit sessions are flushed to the store.
    touch_interval_s: Annotated[float, Field(gt=0)] = 5.0
    op_timeout_ms: Annotated[int, Field(gt=0, le=60_000)] = 500
    # Repins and unpins are also appended to a capped stream that a replica replays when
    # it reconnects (the broadcast reaches only those listening). A replica that missed
    # more entries than the stream keeps drops its whole cache instead.
    repin_log_size: Annotated[int, Field(ge=100, le=10_000_000)] = 10_000
    # After the store lost data, each replica writes back the pins it holds (those used
    # within pin_ttl_s) with pin-if-absent, at most this many per second.
    reassert_per_s: Annotated[int, Field(ge=1, le=1_000_000)] = 20_000
    max_sessions: Annotated[int, Field(gt=0)] = 1_000_000  # in-memory store bound

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _no_hash_tag(cls, value: str) -> str:
        # Cluster slots are chosen by the first {...} in a key: the prefix must not
        # contain one, or every key would land in the same slot.
        if "{" in value or "}" in value:
            raise ValueError("must not contain '{' or '}' (Redis Cluster hash tags)")
        return value

    @field_validator("sentinels")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            match = _ADDRESS.fullmatch(address)
            if match is None or not 0 < int(match.group(2)) < 65536:
                raise ValueError(f"{address!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.topology == "sentinel" and (not self.sentinels or self.sentinel_master is None):
            raise ValueError("topology 'sentinel' needs sentinels and sentinel_master")
        if self.topology != "sentinel" and (self.sentinels or self.sentinel_master):
            raise ValueError("sentinels and sentinel_master need topology 'sentinel'")
        if self.topology == "cluster" and urlsplit(self.url).scheme == "unix":
            raise ValueError("topology 'cluster' needs a redis:// or rediss:// url")
        if self.client_key_file is not None and self.client_cert_file is None:
            raise ValueError("client_key_file needs client_cert_file")
        uses_tls = self.ca_file is not None or self.client_cert_file is not None
        if uses_tls and not self.tls:
            raise ValueError("ca_file and client_cert_file need a rediss:// url")
        return self

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "rediss"

    def masked_url(self) -> str:
        """The URL with any password (userinfo or ``?password=``) replaced by ``***``."""
        parts = urlsplit(self.url)
        netloc = parts.netloc
        if parts.password is not None:
            # Keep the host part exactly as written (IPv6 brackets, case).
            netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
        query = urlencode(
            [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, True)]
        )
        return urlunsplit(parts._replace(netloc=netloc, query=query))

    def describe(self) -> str:
        """Where the store is, for messages: the masked URL, or the sentinel master."""
        if self.topology == "sentinel":
            return f"sentinel master {self.sentinel_master!r} via {','.join(self.sentinels)}"
        if self.topology == "cluster":
            return f"cluster at {self.masked_url()}"
        return self.masked_url()
