"""pinproxy benchmarks: ``python -m bench <scenario>`` (see bench/README.md)."""
