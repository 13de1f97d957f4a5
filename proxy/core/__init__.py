"""Value types and pure rules (models, errors, clock, header and JSON rules, estimators).

The bottom layer: it imports nothing of pinproxy above it and does no I/O."""
