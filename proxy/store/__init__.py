"""Pin stores: where a session's pin lives. ``base`` defines the interface."""

from proxy.store.base import PinStore

__all__ = ["PinStore"]
