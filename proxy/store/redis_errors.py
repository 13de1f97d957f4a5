"""How the pin store fails: Redis errors and unreadable pins, as ``StoreUnavailable``.

The bounded, measured call itself is the shared helper (proxy/redis/call.py); this
module is the pin store's side of it: the error factory it hands the helper, so every
failure redis-py can raise becomes ``StoreUnavailable`` with the store's masked
location and secrets scrubbed from the message, and the refusal of a stored document
that is not a pin. The failure says what the store needs to judge it: whether other
calls answered meanwhile (then this process, not Redis, is slow: ``store_answering``);
the call, whether the last one failed (``failing``: serve cached copies without
asking first).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from proxy.core.errors import StoreUnavailable
from proxy.redis.call import RedisCall, RedisFailure
from proxy.store.redis_wire import decode_pin, scrub, secrets_of

if TYPE_CHECKING:
    from proxy.config.store import StoreConfig
    from proxy.core.clock import Clock
    from proxy.core.models import Pin
    from proxy.redis.metrics import RedisMetrics

_log = logging.getLogger(__name__)

# The pin store's calls, by the name they are measured under (component "store").
STORE_OPERATIONS: Final = ("get", "pin", "repin", "unpin", "count", "activity", "uncount",
                           "ping", "touch", "epoch", "sync", "reassert")


def store_call(
    config: StoreConfig, clock: Clock, metrics: RedisMetrics | None = None
) -> RedisCall:
    """The pin store's bounded call, its failures as ``StoreUnavailable``."""
    secrets = secrets_of(config)

    def unavailable(failure: RedisFailure) -> StoreUnavailable:
        detail = scrub(f"{failure.kind}: {failure.exc}", secrets)
        error = StoreUnavailable(
            f"pin store {failure.what} failed at {config.describe()}: {detail}",
            code="pin_store_unavailable",
        )
        error.timed_out = failure.timed_out
        # Other calls answered while this one waited (for a pooled connection, or for
        # the event loop): Redis works, this process is what is slow.
        error.store_answering = failure.others_answered
        return error

    return RedisCall(
        config.op_timeout_ms / 1000, unavailable, clock=clock.monotonic,
        metrics=metrics, component="store", operations=STORE_OPERATIONS,
    )


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
