"""What pinproxy keeps in Redis: key names and pin documents (clients: redis_client.py).

A pin is a small JSON document (``encode_pin``/``decode_pin``); the pinned-count sorted
sets hold each session id as a member, encoded like its key. Session ids become bytes
with ``surrogatepass`` UTF-8, which is injective and defined for every Python string,
and Redis keys are binary-safe, so no session id can collide with another or break
its key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import orjson

from proxy.core.models import Pin
from proxy.redis.client import redis_client_from_config

__all__ = ["redis_client_from_config"]

if TYPE_CHECKING:
    from proxy.config.store import StoreConfig

_TEXT_FIELDS = ("version_key", "backend_id", "region")  # Pin's fields before pinned_at


class StoreKeys:
    """Every Redis key and channel name the pin store uses, under one prefix.

    ``<prefix>pin:<session>`` holds a pin, ``<prefix>changed:<session>`` the version a
    session lost in a re-assertion conflict (read once, by its next answer),
    ``<prefix>pinned:<version key>`` the sorted set of sessions per version,
    ``<prefix>repins`` the capped stream of repins and unpins (replayed by a replica
    that reconnects), ``<prefix>epoch`` the token whose disappearance means the store
    lost its data, and ``<prefix>invalidate`` the pub/sub channel.

    On a cluster (``cluster=True``) the session part is a hash tag, ``{<session>}``, so
    a session's pin, mark and audit trail share a slot, and the log, the epoch and the
    channel share the ``{sync}`` slot, so the replay reads them in one transaction and
    a change is logged and published together. Standalone and Sentinel keep the
    untagged names, so upgrading does not orphan any stored pin.
    """

    __slots__ = ("_changed", "_close", "_open", "_pin", "_pinned", "channel", "cluster",
                 "epoch", "log")

    def __init__(self, prefix: str, *, cluster: bool = False) -> None:
        raw = prefix.encode()
        self.cluster = cluster
        self._open, self._close = (b"{", b"}") if cluster else (b"", b"")
        self._pin = raw + b"pin:"
        self._changed = raw + b"changed:"
        self._pinned = raw + b"pinned:"
        sync = raw + (b"{sync}" if cluster else b"")
        self.log = sync + b"repins"
        self.epoch = sync + b"epoch"
        self.channel = sync + b"invalidate"

    def session(self, session_id: str) -> bytes:
        """The session's part of its keys (a hash tag on a cluster)."""
        return self._open + member(session_id) + self._close

    def pin(self, session_id: str) -> bytes:
        return self._pin + self.session(session_id)

    def changed(self, session_id: str) -> bytes:
        return self._changed + self.session(session_id)

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
    for secret in (config.password, config.sentinel_password):
        if secret is not None and secret.get_secret_value():
            secrets.append(secret.get_secret_value())
    url_password = urlsplit(config.url).password
    if url_password:
        secrets.append(url_password)
    return tuple(secrets)


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every secret replaced by ``***`` (error messages may quote a URL)."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
