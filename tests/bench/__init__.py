"""Smoke tests of the bench harness (python -m bench)."""
