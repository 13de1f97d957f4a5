"""Pin stores: where a session's pin lives. ``base`` defines the interface."""

from proxy.store.base import Lookup, PinStore

__all__ = ["Lookup", "PinStore"]
