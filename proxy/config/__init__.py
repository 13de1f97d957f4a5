"""The one frozen, validated settings model, split by section.

Pure pydantic; imports only :mod:`proxy.core`."""
