"""Metrics, logs, traces, the audit trail, usage and traffic accounting."""
