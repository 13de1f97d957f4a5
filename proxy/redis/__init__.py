"""Connections and pub/sub shared by every Redis-backed port (pins, control, audit, traffic)."""
