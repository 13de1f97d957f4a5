"""Pin stores: where a session's pin lives. ``base`` defines the interface."""

from proxy.store.base import Activity, Lookup, PinStore

__all__ = ["Activity", "Lookup", "PinStore"]
