"""The pin store's one boundary with redis-py: bounded calls, errors as StoreUnavailable.

Each call is bounded by ``op_timeout_ms`` whatever the injected client's settings, and
every failure redis-py can raise becomes ``StoreUnavailable`` with the store's masked
location, secrets scrubbed from the message. The call also keeps what the store needs
to judge a failure: whether other calls answered meanwhile (then this process, not
Redis, is slow: ``store_answering``), and whether the last call failed (``failing``:
serve cached copies without asking first).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, TypeVar

from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.core.errors import StoreUnavailable
from proxy.redis.client import REDIS_FAILURES
from proxy.store.redis_wire import decode_pin, scrub, secrets_of

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from proxy.config.store import StoreConfig
    from proxy.core.clock import Clock
    from proxy.core.models import Pin

T = TypeVar("T")

_log = logging.getLogger(__name__)


class BoundedCall:
    """``await call(what, operation)``: one Redis operation, bounded and translated."""

    def __init__(self, config: StoreConfig, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._timeout_s = config.op_timeout_ms / 1000
        self._secrets = secrets_of(config)
        self.failing = False  # the last call failed (and not because this process lagged)
        self._answered_at = float("-inf")  # when a call last succeeded (monotonic)

    def scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    async def __call__(self, what: str, operation: Awaitable[T]) -> T:
        started = self._clock.monotonic()
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await operation
        except REDIS_FAILURES as exc:  # OSError covers TimeoutError from asyncio
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # redis-py can turn a cancellation that lands in its own timeout or
                # reconnect handling into an error; the caller asked to stop, so stop.
                raise asyncio.CancelledError from exc
            detail = self.scrub(f"{type(exc).__name__}: {exc}")
            error = StoreUnavailable(
                f"pin store {what} failed at {self._config.describe()}: {detail}",
                code="pin_store_unavailable",
            )
            error.timed_out = isinstance(exc, TimeoutError | RedisTimeoutError)
            # Other calls answered while this one waited (for a pooled connection, or
            # for the event loop): Redis works, this process is what is slow.
            error.store_answering = self._answered_at > started
            if not error.store_answering:
                self.failing = True
            raise error from exc
        self._answered_at = self._clock.monotonic()
        self.failing = False
        return result


def decoded(session_id: str, raw: object) -> Pin:
    """The stored pin; ``StoreUnavailable`` when it is garbled (refuse rather than guess:
    a garbled pin is not the same as no pin)."""
    try:
        return decode_pin(raw)
    except ValueError as exc:
        raise StoreUnavailable(
            f"the stored pin for session {session_id[:64]!r} is unreadable"
        ) from exc


def replaced_pin(session_id: str, raw: object) -> Pin | None:
    """The pin a write replaced, if readable (the write succeeded either way)."""
    if raw is None:
        return None
    try:
        return decoded(session_id, raw)
    except StoreUnavailable as exc:
        # A garbled old value must not turn a successful write into a 503.
        _log.warning("%s (replaced)", exc.message)
        return None
