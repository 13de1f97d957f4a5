"""Session-aware draining: when can a version's capacity go without cutting a conversation?

Per version key, the pin store says how many sessions pinned to it were used in the
last ``versions.active_window_s`` and when one was last used; the last pin expires
``store.pin_ttl_s`` after that. With the Redis store the answer covers every replica
(the per-version sorted sets carry each session's last use, lagging by up to
``store.touch_interval_s``); with the memory store, this process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from proxy.store import PinStore


@dataclass(frozen=True, slots=True)
class Draining:
    """One version's sessions, as an operator removing its capacity needs them."""

    active: int  # pinned sessions used within the active window
    last_used_at: float | None  # the latest request of any session pinned to it
    last_expires_at: float | None  # when the last of its pins expires, if unused until then


async def draining(store: PinStore, keys: Iterable[str], *, window_s: float,
                   pin_ttl_s: float) -> dict[str, Draining]:
    """``Draining`` for each version key, read from ``store`` concurrently."""
    keys = list(keys)
    found = await asyncio.gather(*(store.activity(key, window_s) for key in keys))
    return {
        key: Draining(
            active=a.active, last_used_at=a.last_used_at,
            last_expires_at=None if a.last_used_at is None else a.last_used_at + pin_ttl_s,
        )
        for key, a in zip(keys, found, strict=True)
    }
